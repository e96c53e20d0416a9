"""The logit lens against transformers: each layer's hidden state through the final norm and LM head."""

from __future__ import annotations

import pytest
import torch

from oracle import shared_pair
from qkv.interpret import logit_lens
from tiny_models import random_ids

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["gpt2-untied-ninner", "llama-gqa-6-2"])
def test_each_layer_matches_transformers(name):
    hf, model = shared_pair(name)
    ids = random_ids(97, 2, 9, seed=1)
    lens = logit_lens(model, ids, top_k=4)
    L = model.config.n_layers
    assert lens.token_ids.shape == lens.probs.shape == (2, L, 9, 4)
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
        final_norm = hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm
        for layer in range(L):
            h = hidden[layer + 1] if layer == L - 1 else final_norm(hidden[layer + 1])  # HF's last is normed
            probs, top = hf.lm_head(h).softmax(-1).topk(4, dim=-1)
            assert torch.equal(lens.token_ids[:, layer], top)
            assert torch.allclose(lens.probs[:, layer], probs, atol=1e-5)
    # the last layer is the model's own prediction
    assert torch.equal(lens.token_ids[:, -1, :, 0], model(ids).logits.argmax(-1))


def test_needs_a_decoder_lm():
    from tiny_models import tiny_encoder_with_tokenizer

    with pytest.raises(ValueError, match="not a decoder LM"):
        logit_lens(tiny_encoder_with_tokenizer(), torch.tensor([[3, 4]]))
    _, model = shared_pair("gpt2-untied-ninner")
    with pytest.raises(ValueError, match="top_k"):
        logit_lens(model, torch.tensor([[3, 4]]), top_k=0)


def test_last_positions_are_the_tail_of_the_full_lens():
    _, model = shared_pair("llama-gqa-6-2")
    ids = random_ids(97, 1, 10, seed=3)
    full, tail = logit_lens(model, ids, top_k=3), logit_lens(model, ids, top_k=3, last_positions=4)
    assert torch.equal(tail.token_ids, full.token_ids[:, :, -4:])
    assert torch.allclose(tail.probs, full.probs[:, :, -4:], atol=1e-6)
    with pytest.raises(ValueError, match="last_positions"):
        logit_lens(model, ids, last_positions=11)
