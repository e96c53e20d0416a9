"""DecoderLM against Hugging Face transformers on identical random weights."""

from __future__ import annotations

import pytest
import torch

from qkv import DecoderLM, ModelConfig
from tiny_models import random_ids

TOL = 1e-4


def test_logits_match_hf(hf_pair):
    name, hf, model = hf_pair
    # Longer than the Mistral window (8) and than the dynamic-RoPE original context (16).
    ids = random_ids(model.config.vocab_size, 2, 40, seed=1)
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids).logits
    assert (out - ref).abs().max().item() <= TOL, name


def test_left_padding_matches_hf(hf_pair):
    name, hf, model = hf_pair
    ids = random_ids(model.config.vocab_size, 3, 20, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (out[valid] - ref[valid]).abs().max().item() <= TOL, name


def test_hidden_states_and_attentions_match_hf(hf_pair):
    name, hf, model = hf_pair
    ids = random_ids(model.config.vocab_size, 1, 12, seed=1)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True, output_attentions=True)
        out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.n_layers + 1 == len(ref.hidden_states)
    # HF's last hidden state is after the final norm, like qkv's.
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert (ours - theirs).abs().max().item() <= TOL, name
    for ours, theirs in zip(out.attentions, ref.attentions):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= TOL, name


def test_loss_matches_hf(hf_pair):
    name, hf, model = hf_pair
    ids = random_ids(model.config.vocab_size, 2, 16, seed=1)
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels).loss
        out = model(ids, labels=labels).loss
    assert abs(out.item() - ref.item()) <= 1e-5, name


def test_cache_matches_full_forward(hf_pair):
    name, _, model = hf_pair
    if "dynamic" in name:
        pytest.skip("dynamic NTK rescales RoPE with the current length, so cached keys differ by design")
    ids = random_ids(model.config.vocab_size, 2, 30, seed=1)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 40)
        parts = [model(ids[:, :9], cache=cache).logits]
        parts += [model(ids[:, i : i + 1], cache=cache).logits for i in range(9, 30)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-mistral"])
def test_overfits_one_batch(preset):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name(preset, vocab_size=64))
    ids = torch.randint(0, 64, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_tied_embeddings_share_storage():
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2"))
    assert model.lm_head.weight is model.embed.tokens.weight
    untied = DecoderLM(ModelConfig.from_name("tiny-llama"))
    assert untied.lm_head.weight is not untied.embed.tokens.weight


def test_logits_to_keep_equals_slice():
    model = DecoderLM(ModelConfig.from_name("tiny-llama")).eval()
    ids = random_ids(512, 2, 10, seed=1)
    with torch.no_grad():
        assert torch.allclose(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:], atol=1e-6)


def test_wrong_family_rejected():
    with pytest.raises(ValueError, match="family='decoder'"):
        DecoderLM(ModelConfig(family="encoder", vocab_size=10, d_model=8, n_layers=1, n_heads=2))
