"""The Tokenizer interface: special tokens in text, offsets, batches, id checks, vocabulary look-ups."""

from __future__ import annotations

import pytest
import torch

from qkv.errors import TokenizerError


@pytest.fixture(scope="module")
def bert(trained_wordpiece):
    return trained_wordpiece


def test_encode_batch_equals_one_by_one(bert, trained_bpe, tricky_texts):
    for tok in (bert, trained_bpe):
        assert tok.encode_batch(tricky_texts) == [tok.encode(t) for t in tricky_texts]
        assert tok.encode_batch(tricky_texts, add_special_tokens=False) == [
            tok.encode(t, add_special_tokens=False) for t in tricky_texts
        ]


def test_offsets_cover_the_text(trained_bpe, tricky_texts):
    for text in tricky_texts:
        enc = trained_bpe.encode_with_offsets(text)
        assert enc.ids == trained_bpe.encode(text)
        assert len(enc.ids) == len(enc.tokens) == len(enc.offsets)
        # Byte-level tokens can split a character; joined, the spans still rebuild the text.
        rebuilt, end = "", 0
        for start, stop in enc.offsets:
            rebuilt += text[max(start, end) : stop]
            end = max(end, stop)
        assert rebuilt == text


def test_offsets_point_at_the_words(bert):
    text = "Hello there, Tokenizerization world"
    enc = bert.encode_with_offsets(text)
    assert enc.offsets[0] == enc.offsets[-1] == (0, 0)  # [CLS], [SEP]
    for token, (start, stop) in zip(enc.tokens[1:-1], enc.offsets[1:-1]):
        assert text[start:stop].lower() == token.removeprefix("##")


def test_special_tokens_recognised_by_default_outside_tiktoken(bert):
    text = "hello [MASK] world"
    mask = bert.token_to_id("[MASK]")
    assert mask in bert.encode(text)
    assert mask in bert.encode(text, allowed_special="all")
    assert mask not in bert.encode(text, allowed_special=())
    assert mask in bert.encode(text, allowed_special={"[MASK]"})
    assert bert.token_to_id("[PAD]") not in bert.encode("[PAD] [MASK]", allowed_special={"[MASK]"})
    # The post-processor's [CLS]/[SEP] are added whatever is allowed in the text.
    assert bert.encode(text, allowed_special=())[0] == bert.token_to_id("[CLS]")


def test_allowed_special_subset(bert, tricky_texts):
    # A subset is encoded by a second engine; away from special tokens it must agree with the first.
    plain = [t for t in tricky_texts if not any(s in t for s in bert.all_special_tokens)]
    assert bert.encode_batch(plain, allowed_special={"[MASK]"}) == bert.encode_batch(plain)
    assert [bert.encode(t, allowed_special={"[MASK]"}) for t in plain] == bert.encode_batch(plain)
    ids = bert.encode("[PAD] and [MASK]", add_special_tokens=False, allowed_special={"[MASK]"})
    as_text = bert.encode("[PAD] and", add_special_tokens=False, allowed_special=())
    assert len(as_text) > 2
    assert ids == [*as_text, bert.token_to_id("[MASK]")]


@pytest.mark.parametrize(
    ("allowed", "error", "message"),
    [("none", ValueError, 'must be "all" or a set'), ({"<nope>"}, TokenizerError, "not special tokens")],
)
def test_bad_allowed_special(bert, allowed, error, message):
    with pytest.raises(error, match=message):
        bert.encode("x", allowed_special=allowed)


def test_decode_checks_ids(bert):
    n = bert.vocab_size
    for bad in ([n], [0, -1], [5, n + 100]):
        with pytest.raises(TokenizerError, match=f"token id {bad[-1]} is out of range for a vocabulary of size {n}"):
            bert.decode(bad)
    with pytest.raises(TokenizerError, match="must be integers"):
        bert.decode([1.5])
    with pytest.raises(TokenizerError, match="out of range"):
        bert.id_to_token(n)
    assert bert.decode([]) == ""


def test_decode_accepts_tensors_and_skips_specials(bert):
    ids = bert.encode("return value")
    assert bert.decode(torch.tensor(ids)) == bert.decode(ids)
    assert "[CLS]" in bert.decode(ids)
    assert "[CLS]" not in bert.decode(ids, skip_special_tokens=True)


def test_vocabulary_lookups(bert, trained_bpe):
    assert bert.id_to_token(bert.token_to_id("[SEP]")) == "[SEP]"
    assert bert.token_to_id("no such token at all") is None
    assert (bert.pad_token_id, bert.unk_token_id, bert.bos_token_id) == (0, 1, None)
    assert len(bert) == bert.vocab_size
    assert bert.kind == "wordpiece" and trained_bpe.kind == "bpe"
    assert "vocab_size=1000" in repr(trained_bpe)


def test_text_must_be_a_string(trained_bpe):
    with pytest.raises(TypeError, match="expected text as str, got bytes"):
        trained_bpe.encode(b"bytes")
