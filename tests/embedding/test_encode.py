"""`qkv.embed`: sentence embeddings equal to sentence-transformers' on all-MiniLM-L6-v2 (marked
`real`), with the model's own settings or explicit overrides; batching that changes nothing but
speed; bad input refused by name."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import qkv
from qkv.checkpoints.native import save_native
from qkv.embedding import SentenceEmbeddingConfig, embed, load_sentence_model, read_sentence_config
from qkv.embedding.encode import tokenize
from qkv.errors import QkvError, UsageError
from sentence_reference import assert_same_embeddings, load_reference, parity, reference_embed
from tiny_models import tiny_model


@contextlib.contextmanager
def reference_max_length(st, length: int):
    """The reference with another max_seq_length for the duration."""
    before = st.max_seq_length
    st.max_seq_length = length
    try:
        yield st
    finally:
        st.max_seq_length = before


def reference_token_ids(st, texts: list[str]) -> list[list[int]]:
    """The ids sentence-transformers feeds its model (its own tokenization, padding removed)."""
    features = st.preprocess(texts) if hasattr(st, "preprocess") else st.tokenize(texts)
    return [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]


# ----- real weights: parity with sentence-transformers ------------------------------------------


@pytest.mark.real
@pytest.mark.parametrize("batch_size", [1, 5, 32])
def test_matches_sentence_transformers(minilm, st_model, varied_texts, batch_size):
    ours = embed(minilm, minilm.tokenizer, varied_texts, batch_size=batch_size)
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert_same_embeddings(ours, reference_embed(st_model, varied_texts), varied_texts)


@pytest.mark.real
def test_public_entry_point_is_the_same_function(minilm, st_model):
    texts = ["qkv.embed is exported at the top level", "and works as embed does"]
    assert_same_embeddings(qkv.embed(minilm, None, texts), reference_embed(st_model, texts))


@pytest.mark.real
def test_settings_are_read_from_the_model_files(minilm_path, st_model):
    """Pooling mode, Normalize module and max_seq_length as sentence-transformers reads the same files."""
    config = read_sentence_config(minilm_path)
    pooling, *rest = list(st_model)[1:]
    assert config.pooling == pooling.pooling_mode
    assert config.normalize == any(type(m).__name__ == "Normalize" for m in rest)
    assert config.max_seq_length == st_model.max_seq_length
    assert config.lowercase is False  # the package's sentence_bert_config.json: "do_lower_case": false


@pytest.mark.real
def test_truncation_keeps_special_tokens_like_sentence_transformers(minilm, st_model, varied_texts):
    ours = tokenize(minilm.tokenizer, varied_texts, minilm.sentence_config.max_seq_length)
    theirs = reference_token_ids(st_model, varied_texts)
    assert ours == theirs
    assert max(map(len, ours)) == st_model.max_seq_length  # the long texts were cut, to the limit


@pytest.mark.real
@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
@pytest.mark.parametrize("normalize", [True, False])
def test_overrides_match_sentence_transformers_built_the_same_way(minilm, st_model, varied_texts, pooling, normalize):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    width = reference_embed(st_model, ["x"]).shape[-1]
    modules = [st_model[0], sentence_transformers.models.Pooling(width, pooling)]
    if normalize:
        modules.append(sentence_transformers.models.Normalize())
    reference = sentence_transformers.SentenceTransformer(modules=modules, device="cpu")
    with reference_max_length(st_model, 64):  # the Transformer module is shared with `reference`
        theirs = reference_embed(reference, varied_texts)
        ours = embed(minilm, None, varied_texts, pooling=pooling, normalize=normalize, max_length=64)
    assert_same_embeddings(ours, theirs, varied_texts)


@pytest.mark.real
def test_lowercase_setting_matches_sentence_transformers(minilm_path, tmp_path):
    """do_lower_case in sentence_bert_config.json (false in the package) read and applied as s-t
    does. The vocabulary lowercases already, so compare on a copy whose tokenizer keeps case
    (tokenizer.json's normalizer, and tokenizer_config.json, which transformers reads instead)."""
    for item in minilm_path.iterdir():
        (tmp_path / item.name).symlink_to(item)
    rewrites = {
        "sentence_bert_config.json": lambda config: {"max_seq_length": 128, "do_lower_case": True},
        "tokenizer.json": lambda config: {**config, "normalizer": {**config["normalizer"], "lowercase": False}},
        "tokenizer_config.json": lambda config: {**config, "do_lower_case": False},
    }
    for name, rewrite in rewrites.items():
        config = json.loads((minilm_path / name).read_text(encoding="utf-8"))
        (tmp_path / name).unlink()
        (tmp_path / name).write_text(json.dumps(rewrite(config)), encoding="utf-8")
    model = load_sentence_model(tmp_path)
    assert model.sentence_config == SentenceEmbeddingConfig("mean", True, 128, lowercase=True)
    texts = ["MIXED Case Text", "ÉCOLE Ünïcödé", "all lower", "ΣΊΣΥΦΟΣ İstanbul"]
    reference = load_reference(tmp_path)
    assert tokenize(model.tokenizer, texts, 128, lowercase=True) == reference_token_ids(reference, texts)
    assert_same_embeddings(embed(model, None, texts), reference_embed(reference, texts), texts)


@pytest.mark.real
def test_bfloat16_model_stays_close(minilm_path, st_model, varied_texts):
    """bf16 is for speed; its rows stay within 1e-3 of the float32 reference in cosine."""
    model = load_sentence_model(minilm_path, dtype="bfloat16")
    cosine, _ = parity(embed(model, None, varied_texts), reference_embed(st_model, varied_texts))
    assert cosine.min() > 0.999


# ----- batching, order, state (a tiny random encoder) --------------------------------------------

TEXTS = ["def f(x): return x", "", "import os, sys", "class A:\n    pass", "x = [i for i in range(10)] " * 5, "a"]


def test_batched_equals_one_by_one_in_input_order(tiny_encoder):
    one_by_one = torch.cat([embed(tiny_encoder, None, [text]) for text in TEXTS])
    for batch_size in (1, 2, 4, 32):
        torch.testing.assert_close(embed(tiny_encoder, None, TEXTS, batch_size=batch_size), one_by_one)


def test_pooling_reads_the_model_output(tiny_encoder):
    """Without a sentence config: mean pooling over the tokens, no normalisation (s-t's defaults)."""
    ids = tiny_encoder.tokenizer.encode(TEXTS[0])
    hidden = tiny_encoder(torch.tensor([ids])).last_hidden_state
    torch.testing.assert_close(embed(tiny_encoder, None, TEXTS[:1]), hidden.mean(1).detach())
    torch.testing.assert_close(embed(tiny_encoder, None, TEXTS[:1], pooling="cls"), hidden[:, 0].detach())


def test_config_argument_and_model_attribute(tiny_encoder):
    config = SentenceEmbeddingConfig(pooling="max", normalize=True, max_seq_length=8)
    explicit = embed(tiny_encoder, None, TEXTS, config=config)
    torch.testing.assert_close(explicit.norm(dim=-1), torch.ones(len(TEXTS)))
    tiny_encoder.sentence_config = config
    try:
        torch.testing.assert_close(embed(tiny_encoder, None, TEXTS), explicit)
        torch.testing.assert_close(
            embed(tiny_encoder, None, TEXTS, normalize=False).norm(dim=-1) != 1, torch.ones(len(TEXTS)).bool()
        )
    finally:
        del tiny_encoder.sentence_config


def test_training_mode_is_restored(tiny_encoder):
    tiny_encoder.train()
    try:
        first = embed(tiny_encoder, None, TEXTS)
        assert tiny_encoder.training
        torch.testing.assert_close(embed(tiny_encoder, None, TEXTS), first)  # dropout was off
    finally:
        tiny_encoder.eval()


# ----- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "no texts to embed"),
        ("one string", r"wrap it: \[text\]"),
        (["fine", 3, "fine"], r"texts\[1\] is a int"),
        (["fine", None], r"texts\[1\] is a NoneType"),
        (42, "must be a list of strings"),
    ],
)
def test_bad_texts_are_named(tiny_encoder, texts, message):
    with pytest.raises(UsageError, match=message):
        embed(tiny_encoder, None, texts)


def test_a_decoder_is_refused(tmp_path):
    decoder = tiny_model("tiny-gpt2")
    save_native(decoder, tmp_path / "decoder")
    with pytest.raises(UsageError, match="needs an encoder model .* got a decoder model"):
        load_sentence_model(tmp_path / "decoder")
    with pytest.raises(UsageError, match="needs an encoder model .* got a decoder model"):
        embed(decoder, None, ["text"])
    with pytest.raises(UsageError, match="needs an encoder model"):
        embed("all-minilm-l6-v2", None, ["text"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
        ({"max_length": 1000}, "exceeds the model's context of 128 tokens"),
        ({"max_length": 2}, "leaves no room for text"),
        ({"max_length": 0}, "must be a positive integer"),
        ({"pooling": "weightedmean"}, "pooling='weightedmean' is not supported"),
    ],
)
def test_bad_options_are_named(tiny_encoder, options, message):
    with pytest.raises(QkvError, match=message):
        embed(tiny_encoder, None, ["long enough " * 20], **options)


def test_no_tokenizer(tiny_encoder):
    tokenizer, tiny_encoder.tokenizer = tiny_encoder.tokenizer, None
    try:
        with pytest.raises(UsageError, match="no tokenizer"):
            embed(tiny_encoder, None, ["text"])
    finally:
        tiny_encoder.tokenizer = tokenizer
