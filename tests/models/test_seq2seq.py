"""`EncoderDecoder` (T5 v1.0/v1.1, BART, Marian) against Hugging Face `transformers`, through `qkv.load`.

Tiny random HF models saved by `save_pretrained` load through qkv's own loader; logits, the
encoder's and decoder's hidden states and the cross-attention weights equal HF's with a padded
source, greedy and beam-search generation return what HF's `generate` returns, and export
round-trips.
"""

from __future__ import annotations

import functools

import pytest
import torch

import qkv
from qkv.checkpoints import export_hf
from qkv.errors import UsageError

transformers = pytest.importorskip("transformers")

TOL = 1e-4
_T5 = dict(
    vocab_size=99,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    decoder_start_token_id=0,
)
_BART = dict(
    vocab_size=99,
    d_model=32,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=40,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=None,
)
CASES = {
    "t5-v1.0": ("T5ForConditionalGeneration", "T5Config", _T5),
    "t5-v1.1": ("T5ForConditionalGeneration", "T5Config", {**_T5, "feed_forward_proj": "gated-gelu",
                                                          "tie_word_embeddings": False}),
    "bart": ("BartForConditionalGeneration", "BartConfig", _BART),
    "bart-scaled": ("BartForConditionalGeneration", "BartConfig", {**_BART, "scale_embedding": True}),
    "marian": ("MarianMTModel", "MarianConfig", {**_BART, "pad_token_id": 98, "decoder_start_token_id": 98,
                                                 "eos_token_id": 0, "bos_token_id": None, "scale_embedding": True,
                                                 "activation_function": "swish", "forced_eos_token_id": None}),
}  # fmt: skip


@functools.cache
def _pair(case: str, root: str) -> tuple:
    cls, config_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")  # returns weights
    hf = getattr(transformers, cls)(config).eval()
    if hasattr(hf, "final_logits_bias"):  # zero at init: give it values so the test sees it
        hf.final_logits_bias.normal_()
    path = f"{root}/{case}"
    hf.save_pretrained(path)
    return hf, qkv.load(path), path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("seq2seq"))


def _source(hf, batch: int = 3, length: int = 11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    return ids.masked_fill(mask == 0, hf.config.pad_token_id), mask


@pytest.mark.parametrize("case", CASES)
def test_logits_hidden_states_and_cross_attention_equal_hf(case, root):
    hf, model, _ = _pair(case, root)
    ids, mask = _source(hf)
    target = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(2))
    kwargs = dict(attention_mask=mask, decoder_input_ids=target, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ref, ours = hf(ids, **kwargs), model(ids, **kwargs)
    assert type(model) is qkv.models.EncoderDecoder
    assert (ours.logits - ref.logits).abs().max().item() <= TOL
    pairs = [
        (ours.encoder_hidden_states, ref.encoder_hidden_states),
        (ours.hidden_states, ref.decoder_hidden_states),
        (ours.attentions, ref.decoder_attentions),
        (ours.cross_attentions, ref.cross_attentions),
        (ours.encoder_attentions, ref.encoder_attentions),
    ]
    for a, b in pairs:
        assert len(a) == len(b)
        assert max((x - y).abs().max().item() for x, y in zip(a, b, strict=True)) <= TOL
    assert ours.cross_attentions[0].shape == (3, 4, 7, 11)  # target x source


@pytest.mark.parametrize("case", CASES)
def test_loss_with_labels_equals_hf(case, root):
    hf, model, _ = _pair(case, root)
    ids, mask = _source(hf)
    labels = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(3))
    labels[0, 4:] = -100
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels).loss
        ours = model(ids, attention_mask=mask, labels=labels).loss
    assert abs(ours.item() - ref.item()) <= TOL


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_equals_hf(case, num_beams, root):
    hf, model, _ = _pair(case, root)
    ids, mask = _source(hf)
    options = dict(max_new_tokens=9, num_beams=num_beams, eos_token_id=model.config.eos_token_id,
                   pad_token_id=hf.config.pad_token_id)  # fmt: skip
    ours = model.generate(ids, attention_mask=mask, **options)
    # use_cache=False: transformers 5.24 sizes T5's cache by num_layers and fails when the decoder is deeper.
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, use_cache=False, **options)
    assert ours.tolist() == ref.tolist()


@pytest.mark.parametrize("case", CASES)
def test_export_round_trips_through_transformers(case, root, tmp_path):
    hf, model, _ = _pair(case, root)
    again = getattr(transformers, CASES[case][0]).from_pretrained(export_hf(model, tmp_path / "out")).eval()
    ids, mask = _source(hf)
    target = torch.randint(3, 90, (3, 5))
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, decoder_input_ids=target).logits
        b = again(ids, attention_mask=mask, decoder_input_ids=target).logits
    assert (a - b).abs().max().item() <= TOL


def test_cached_decoding_equals_the_full_forward(root):
    """The decoder's self-attention cache and the cross-attention keys/values computed once."""
    hf, model, _ = _pair("t5-v1.1", root)
    ids, mask = _source(hf)
    target = torch.randint(3, 90, (3, 8))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, decoder_input_ids=target).logits
        cache = model.new_cache(3, 16)
        model.encode(ids, mask, cache=cache)
        steps = [model.decode(target[:, :3], cache)] + [model.decode(target[:, t : t + 1], cache) for t in range(3, 8)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    assert len(cache.cross_kv) == model.config.n_decoder_layers


def test_bad_input_is_a_clear_error(root):
    hf, model, _ = _pair("bart", root)
    ids, mask = _source(hf)
    with pytest.raises(UsageError, match="decoder_input_ids or labels"):
        model(ids, attention_mask=mask)
    with pytest.raises(UsageError, match="3 rows but decoder_input_ids has 2"):
        model(ids, attention_mask=mask, decoder_input_ids=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's context of 40"):
        model(torch.randint(3, 90, (1, 41)), decoder_input_ids=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="compile=True does not support encoder-decoder"):
        model.generate(ids[:1], 4, compile=True)


def test_label_smoothing_is_the_smoothed_cross_entropy(root):
    """Vaswani et al. 2017 §5.4: with label_smoothing=e the loss is (1 - e) NLL + e x the mean over
    the vocabulary of -log p (Szegedy et al. 2016), over the labels that count."""
    _, model, _ = _pair("marian", root)
    smoothed = qkv.models.EncoderDecoder(model.config.replace(label_smoothing=0.1)).eval()
    smoothed.load_state_dict(model.state_dict())
    ids, mask = _source(model)
    labels = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(5))
    labels[1, 4:] = -100
    with torch.no_grad():
        out = smoothed(ids, attention_mask=mask, labels=labels)
        logp = out.logits.log_softmax(-1)[labels != -100]
        kept = labels[labels != -100]
        nll = -logp.gather(-1, kept[:, None]).mean()
        uniform = -logp.mean()
    assert abs(out.loss.item() - (0.9 * nll + 0.1 * uniform).item()) <= 1e-5
