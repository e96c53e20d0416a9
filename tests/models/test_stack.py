"""`TransformerStack.run`: an eager prompt chunk over a static cache attends to the written slots only."""

from __future__ import annotations

import pytest
import torch

import qkv.nn.attention as attention
from tiny_models import random_ids, tiny_model


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_a_static_cache_chunk_equals_a_dynamic_cache_chunk_and_takes_the_causal_path(preset, monkeypatch):
    """Chunks of a prompt written at consecutive slots of a static cache (as generate's prefill
    writes them) give a dynamic cache's logits, through the causal mask over the slots written so
    far rather than a dense mask over the whole buffer (which a compiled decode step still gets)."""
    model = tiny_model(preset, d_model=64, n_heads=4)
    ids = random_ids(model.config.vocab_size, 2, 24, seed=5)
    masks = []
    real = attention.scaled_dot_product_attention
    monkeypatch.setattr(attention, "scaled_dot_product_attention", lambda q, k, v, mask, **kw: masks.append(
        (mask, k.shape[2])) or real(q, k, v, mask, **kw))  # fmt: skip
    static, dynamic = model.new_cache(2, 40, static=True), model.new_cache(2, 40)
    with torch.no_grad():
        for start, end in ((0, 10), (10, 24)):
            a = model(ids[:, start:end], cache=static, input_pos=torch.arange(start, end)).logits
            b = model(ids[:, start:end], cache=dynamic).logits
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        one = model(ids[:, :1], cache=static, input_pos=torch.tensor([24]))  # a decode step: the whole buffer
    chunk_masks = [(m.is_causal, m.bias is None, S) for m, S in masks[: model.config.n_layers]]
    assert chunk_masks == [(True, True, 10)] * model.config.n_layers
    later = [(m.is_causal, m.bias is None, S) for m, S in masks[2 * model.config.n_layers : 3 * model.config.n_layers]]
    assert later == [(True, True, 24)] * model.config.n_layers  # queries 10..23, the last of 24 keys
    assert masks[-1][1] == 40 and one.logits.shape == (2, 1, model.config.vocab_size)
