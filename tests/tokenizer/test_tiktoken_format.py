"""tiktoken rank files: qkv's ids equal tiktoken's, on hard text and on Python's own sources."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import tiktoken
from tiktoken_ext import openai_public

from qkv.errors import TokenizerError
from qkv.tokenizer import load_tokenizer, tokenizer_from_tiktoken
from qkv.tokenizer.tiktoken_format import ENCODINGS, to_oniguruma


def test_cl100k_ids_equal_tiktoken_on_corpus(cl100k, tiktoken_cl100k, corpus):
    assert cl100k.encode_batch(corpus) == tiktoken_cl100k.encode_ordinary_batch(corpus)


def test_cl100k_single_and_batch_agree(cl100k, corpus):
    sample = corpus[:40]
    assert [cl100k.encode(t) for t in sample] == cl100k.encode_batch(sample)


def test_cl100k_ids_equal_tiktoken_on_fuzzed_text(cl100k, tiktoken_cl100k, fuzzed_texts):
    texts = fuzzed_texts
    assert cl100k.encode_batch(texts) == tiktoken_cl100k.encode_ordinary_batch(texts)


def test_cl100k_decode_round_trips(cl100k, corpus):
    assert cl100k.decode_batch(cl100k.encode_batch(corpus)) == corpus


def test_cl100k_special_tokens(cl100k, tiktoken_cl100k):
    expected = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259}
    expected |= {"<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
    assert {t: cl100k.token_to_id(t) for t in expected} == expected
    assert cl100k.eos_token_id == tiktoken_cl100k.eot_token
    assert cl100k.vocab_size == tiktoken_cl100k.n_vocab


@pytest.mark.parametrize("allowed", ["all", set(), {"<|fim_prefix|>"}, {"<|endoftext|>", "<|endofprompt|>"}], ids=repr)
def test_allowed_special_as_tiktoken(cl100k, tiktoken_cl100k, allowed):
    text = "a<|endoftext|>b <|fim_prefix|>c<|endofprompt|> <|fim_middle|>"
    assert cl100k.encode(text, allowed_special=allowed) == tiktoken_cl100k.encode(
        text, allowed_special=allowed, disallowed_special=()
    )


def test_special_tokens_are_plain_text_by_default(cl100k, tiktoken_cl100k):
    text = "x <|endoftext|> y"
    assert cl100k.encode(text) == tiktoken_cl100k.encode_ordinary(text)
    assert cl100k.token_to_id("<|endoftext|>") not in cl100k.encode(text)


@pytest.mark.parametrize("text", ["ab\ud800cd", "\udfff", "pair \ud83d\ude00 joined", "x\ud83dy\ude00\ud800"], ids=repr)
def test_surrogates_replaced_as_tiktoken(cl100k, tiktoken_cl100k, text):
    ids = cl100k.encode(text)
    assert ids == tiktoken_cl100k.encode_ordinary(text)
    assert cl100k.encode_batch([text]) == [ids]
    assert cl100k.decode(ids) == tiktoken_cl100k.decode(ids)


def test_partial_utf8_decodes_with_replacement_as_tiktoken(cl100k, tiktoken_cl100k):
    ids = tiktoken_cl100k.encode_ordinary("日本👍")
    for cut in range(len(ids) + 1):
        assert cl100k.decode(ids[:cut]) == tiktoken_cl100k.decode(ids[:cut])


def test_possessive_bounded_repeat_is_rewritten():
    # Oniguruma reads `{1,3}+` as "repeat a 1-3 run", which would swallow whole numbers.
    assert to_oniguruma(r"\p{N}{1,3}+| ?\p{L}++") == r"\p{N}{1,3}| ?\p{L}++"
    assert to_oniguruma(r"\{1,3}+") == r"\{1,3}+"


@pytest.fixture(scope="module")
def head_ranks(tiktoken_cl100k, tmp_path_factory) -> tuple[dict[bytes, int], Path]:
    """cl100k's first 5000 ranks (all bytes and the commonest merges), and a rank file of them."""
    ranks = {token: rank for token, rank in tiktoken_cl100k._mergeable_ranks.items() if rank < 5000}
    path = tmp_path_factory.mktemp("ranks") / "head.tiktoken"
    _write_ranks(path, ranks)
    return ranks, path


@pytest.mark.parametrize("name", ["r50k_base", "p50k_base", "o200k_base"])
def test_other_encodings_split_text_as_tiktoken(name, head_ranks, fuzzed_texts, monkeypatch):
    # Only cl100k's rank file is on disk. The other encodings' regex and special tokens are
    # checked against tiktoken's own definition of them, both sides using (part of) cl100k's ranks.
    ranks, path = head_ranks
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks)
    definition = getattr(openai_public, name)()
    assert dict(ENCODINGS[name].special_tokens) == definition["special_tokens"]
    # Their special ids are past these ranks' end; both sides move them down to the next free ids.
    specials = {token: 5000 + i for i, token in enumerate(definition["special_tokens"])}
    reference = tiktoken.Encoding(
        name=name, pat_str=definition["pat_str"], mergeable_ranks=ranks, special_tokens=specials
    )
    tok = tokenizer_from_tiktoken(path, encoding=name, special_tokens=specials)
    texts = fuzzed_texts
    assert tok.encode_batch(texts) == reference.encode_ordinary_batch(texts)
    text = "a<|endoftext|>b<|endofprompt|>"
    assert tok.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")


def _write_ranks(path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


@pytest.fixture
def byte_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 256
    return ranks


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("YQ== 0\nYg== notanumber\n", "line 2"),
        ("YQ== 0\n!!!! 1\n", "line 2"),
        ("YQ== 0 7\n", "line 1"),
        ("YQ== 0\nYQ== 1\n", "appears twice"),
        ("YQ== 0\nYg== 1\n", "single-byte tokens"),
    ],
    ids=["empty", "bad-rank", "bad-base64", "extra-field", "duplicate", "missing-bytes"],
)
def test_malformed_rank_file(tmp_path, content, message):
    path = tmp_path / "cl100k_base.tiktoken"
    path.write_text(content)
    with pytest.raises(TokenizerError, match=message) as info:
        tokenizer_from_tiktoken(path)
    assert str(path) in str(info.value)


def test_truncated_rank_file(tmp_path, cl100k_path):
    path = tmp_path / "cl100k_base.tiktoken"
    data = cl100k_path.read_bytes()
    path.write_bytes(data[:1000] + b"\n")  # cut mid-file, after a few dozen single bytes
    with pytest.raises(TokenizerError, match=r"single-byte tokens|line \d+"):
        tokenizer_from_tiktoken(path)


def test_missing_rank_file(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        tokenizer_from_tiktoken(tmp_path / "cl100k_base.tiktoken")


def test_unknown_encoding_needs_a_pattern(tmp_path, byte_ranks):
    path = tmp_path / "mine.tiktoken"
    _write_ranks(path, byte_ranks)
    with pytest.raises(TokenizerError, match="unknown tiktoken encoding 'mine'"):
        tokenizer_from_tiktoken(path)
    tok = tokenizer_from_tiktoken(path, pattern=r"\S+|\s+", special_tokens={"<eot>": 300})
    reference = tiktoken.Encoding("mine", pat_str=r"\S+|\s+", mergeable_ranks=byte_ranks, special_tokens={"<eot>": 300})
    text = "abab cab<eot>"
    assert tok.encode(text) == reference.encode_ordinary(text)
    assert tok.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")


def test_special_token_id_clash(tmp_path, byte_ranks):
    path = tmp_path / "mine.tiktoken"
    _write_ranks(path, byte_ranks)
    with pytest.raises(TokenizerError, match="id 256"):
        tokenizer_from_tiktoken(path, pattern=r"\S+", special_tokens={"<eot>": 256})


def test_saved_cl100k_reloads_identically(cl100k, tiktoken_cl100k, tricky_texts, tmp_path):
    cl100k.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.split_special_tokens  # still reads special tokens in text as plain text
    assert reloaded.encode_batch(tricky_texts) == tiktoken_cl100k.encode_ordinary_batch(tricky_texts)
    assert reloaded.vocab_size == cl100k.vocab_size and reloaded.eos_token_id == 100257
    with pytest.raises(TokenizerError, match="100270 is not in the vocabulary"):
        reloaded.decode([100270])
