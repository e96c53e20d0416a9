"""Vocabularies inside GGUF files: SentencePiece (llama) and byte-level BPE (gpt2) give the ids of
the tokenizer they were written from."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as Engine
from tokenizers import pre_tokenizers

from qkv import hub
from qkv.errors import TokenizerError
from qkv.tokenizer import load_tokenizer, read_gguf_metadata, tokenizer_from_gguf_fields
from tiny_tokenizers import BYTE_TOKENS, sentencepiece_engine

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = (int(t) for t in gguf.TokenType if t.name != "UNUSED")


def write_gguf(path, *, model=None, tokens=None, scores=None, types=None, merges=None, pre=None, **extra) -> None:
    """A GGUF file with only metadata (GGUFWriter needs no tensors)."""
    writer = gguf.GGUFWriter(path, arch="llama")
    if model is not None:
        writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    if tokens is not None:
        writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    if types is not None:
        writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sentencepiece_reference(texts: list[str]) -> Engine:
    """The SentencePiece-style reference (tests/tiny_tokenizers.py) with two added tokens."""
    return sentencepiece_engine(texts, vocab_size=1500, limit_alphabet=70, extra_specials=["<|im_end|>"],
                                added=["<think>"])  # fmt: skip


@pytest.fixture(scope="module")
def sentencepiece(small_corpus, tmp_path_factory):
    """(reference engine, path of a llama-style GGUF of its vocabulary)."""
    reference = sentencepiece_reference(small_corpus)
    vocab = reference.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))

    def kind(token: str) -> int:
        if token == "<unk>":
            return UNKNOWN
        if token in ("<s>", "</s>", "<|im_end|>"):
            return CONTROL
        return USER_DEFINED if token == "<think>" else BYTE if token in BYTE_TOKENS else NORMAL

    types = [kind(t) for t in tokens]
    # As llama.cpp's converter scores a BPE SentencePiece model: earlier merges score higher.
    scores = [-float(i) if k == NORMAL else 0.0 for i, k in enumerate(types)]
    path = tmp_path_factory.mktemp("gguf") / "spm.gguf"
    write_gguf(
        path, model="llama", tokens=tokens, scores=scores, types=types,
        bos_token_id=1, eos_token_id=2, unk_token_id=0, chat_template="{{ bos_token }}{{ messages[0].content }}",
    )  # fmt: skip
    return reference, path


def test_sentencepiece_ids_equal_reference(sentencepiece, short_corpus):
    reference, path = sentencepiece
    tok = load_tokenizer(path)
    texts = [*short_corpus, "  two leading spaces", "tabs\tand\nnewlines", "a<|im_end|>b <think> c"]
    expected = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    assert tok.encode_batch(texts, add_special_tokens=False) == expected
    # Characters outside the alphabet became <0xNN> byte tokens, so byte fallback was exercised.
    assert any(i in range(3, 259) for ids in expected for i in ids)
    assert tok.decode_batch(expected) == reference.decode_batch(expected, skip_special_tokens=False)


def test_sentencepiece_adds_bos_and_special_roles(sentencepiece):
    reference, path = sentencepiece
    tok = load_tokenizer(path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    assert tok.encode("hello") == [1, *reference.encode("hello", add_special_tokens=False).ids]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"


def test_fields_api_matches_file(sentencepiece, tricky_texts):
    # The checkpoint loader passes the metadata its own reader parsed: arrays may be numpy or tuples.
    _, path = sentencepiece
    fields = read_gguf_metadata(path)
    fields["tokenizer.ggml.scores"] = np.asarray(fields["tokenizer.ggml.scores"], dtype=np.float32)
    fields["tokenizer.ggml.tokens"] = tuple(fields["tokenizer.ggml.tokens"])
    fields["tokenizer.ggml.bos_token_id"] = np.uint32(fields["tokenizer.ggml.bos_token_id"])
    from_fields = tokenizer_from_gguf_fields(fields, source=str(path))
    assert from_fields.encode_batch(tricky_texts) == load_tokenizer(path).encode_batch(tricky_texts)


@pytest.fixture(scope="module")
def byte_level_reference(trained_bpe):
    """The trained byte-level BPE, and the same vocabulary with digits split one by one first."""
    digits = Engine.from_str(trained_bpe.engine.to_str())
    digits.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return {"gpt2": trained_bpe.engine, "smollm": digits}


@pytest.mark.parametrize("pre", ["gpt2", "smollm"])
def test_byte_level_bpe_ids_equal_reference(pre, byte_level_reference, trained_bpe, short_corpus, tmp_path):
    reference = byte_level_reference[pre]
    vocab = reference.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) for m in json.loads(reference.to_str())["model"]["merges"]]
    types = [CONTROL if t == "<|endoftext|>" else NORMAL for t in tokens]
    path = tmp_path / "bpe.gguf"
    write_gguf(path, model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges, eos_token_id=0)
    tok = load_tokenizer(path)
    texts = [*short_corpus, "year 2024: 1234567 items"]
    assert tok.encode_batch(texts) == [e.ids for e in reference.encode_batch(texts)]
    assert tok.eos_token_id == trained_bpe.eos_token_id


@pytest.mark.real
def test_smollm2_gguf_vocabulary(tricky_texts):
    path = hub.pull("smollm2-135m-instruct", quiet=True)
    fields = read_gguf_metadata(path)
    tok = tokenizer_from_gguf_fields(fields, source=str(path))
    assert tok.vocab_size == len(fields["tokenizer.ggml.tokens"]) == 49152
    assert tok.bos_token_id == fields["tokenizer.ggml.bos_token_id"]
    assert tok.eos_token_id == fields["tokenizer.ggml.eos_token_id"]
    assert tok.decode_batch(tok.encode_batch(tricky_texts)) == tricky_texts
    # pre "smollm": digits are split one by one before byte-level BPE.
    assert [tok.decode([i]) for i in tok.encode("in 2024")] == ["in", " ", "2", "0", "2", "4"]
    chat = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(chat)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                                                      "<|im_start|>assistant\n")  # fmt: skip
    ids = tok.apply_chat_template(chat, tokenize=True)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 3
    assert tok.decode(ids) == text


def test_gguf_without_vocabulary(tmp_path):
    path = tmp_path / "weights-only.gguf"
    write_gguf(path)
    with pytest.raises(TokenizerError, match="holds no tokenizer vocabulary") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_truncated_gguf(sentencepiece, tmp_path):
    _, source = sentencepiece
    path = tmp_path / "cut.gguf"
    path.write_bytes(source.read_bytes()[:3000])
    with pytest.raises(TokenizerError, match="could not be read") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a gguf file at all")
    with pytest.raises(TokenizerError, match="could not be read"):
        load_tokenizer(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "gpt2", "tokens": ["a", "b", "ab"]}, "has no tokenizer.ggml.merges"),
        ({"model": "gpt2", "tokens": ["a", "b"], "merges": ["a b"]}, r"merges\[0\] 'a b' joins tokens"),
        ({"model": "gpt2", "tokens": ["a", "b", "ab"], "merges": ["ab"]}, "expected 'left right'"),
        ({"model": "llama", "tokens": ["a", "b"]}, "has no tokenizer.ggml.scores"),
        ({"model": "llama", "tokens": ["a", "b"], "scores": [0.0]}, "scores has 1 entries but"),
        ({"model": "llama", "tokens": ["a"], "scores": [0.0], "types": [1, 1]}, "token_type has 2 entries"),
        ({"model": "bert", "tokens": ["a"]}, "'bert' is not supported"),
        ({"model": "llama", "tokens": ["a"], "scores": [0.0], "bos_token_id": 5}, "bos_token_id 5 is outside"),
    ],
)
def test_malformed_vocabulary(fields, message, tmp_path):
    path = tmp_path / "bad.gguf"
    write_gguf(path, **fields)
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def _byte_level_fields(tokens, merges, types=None) -> dict:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": types or [NORMAL] * len(tokens)}  # fmt: skip


def test_byte_level_plain_text_tokens_are_respelled():
    """A normal token stored as plain text ("c d") gets its byte-level spelling; a control token keeps its own."""
    fields = _byte_level_fields(["a", "b", "ab", "c d", "<|x y|>"], ["a b"], [NORMAL] * 4 + [CONTROL])
    tok = tokenizer_from_gguf_fields(fields)
    assert [tok.token_to_id(t) for t in ("ab", "cĠd", "c d", "<|x y|>")] == [2, 3, None, 4]
    assert tok.vocab_size == 5 and tok.encode("ab<|x y|>") == [2, 4]


def test_byte_level_repeated_tokens_leave_a_gap():
    tok = tokenizer_from_gguf_fields(_byte_level_fields(["a", "b", "a"], []))
    assert tok.vocab_size == 3 and tok.token_to_id("a") == 2
    with pytest.raises(TokenizerError, match="unused gap"):
        tok.decode([0])


def test_byte_level_merge_with_an_empty_part_is_refused_even_if_the_empty_token_exists():
    with pytest.raises(TokenizerError, match=r"merges\[1\] is 'a ', expected 'left right'"):
        tokenizer_from_gguf_fields(_byte_level_fields(["a", "", "b", "ab"], ["a b", "a "]))
