"""The static-shape decode step (`DecoderLM.static_step`) and `generate(compile=True)`."""

from __future__ import annotations

import pytest
import torch

from qkv import DecoderLM, KVCache, ModelConfig
from qkv.generation.decode import static_cache_len


def _model(preset: str, **overrides) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig.from_name(preset, **overrides)).eval()


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny-gpt2", {}),
        ("tiny-llama", {}),
        ("tiny-mistral", {"sliding_window": 6}),
        ("tiny-llama", {"position": "alibi"}),
    ],
)
def test_static_step_equals_forward(preset, overrides):
    model = _model(preset, **overrides)
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 2, 64, static=True)
        parts = [model.static_step(ids[:, :9], torch.arange(9), cache)]
        parts += [model.static_step(ids[:, i : i + 1], torch.tensor([i]), cache) for i in range(9, 30)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_static_cache_len_rounds_up_within_the_context():
    assert static_cache_len(166, 8192) == 256
    assert static_cache_len(300, 8192) == 512
    assert static_cache_len(300, 400) == 400
    assert static_cache_len(10, None) == 256


def test_compiled_generate_equals_eager():
    model = _model("tiny-llama")
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(2))
    eager = model.generate(ids, max_new_tokens=20)
    assert torch.equal(model.generate(ids, max_new_tokens=20, compile=True), eager)
    assert torch.equal(model.generate(ids[:, :5], max_new_tokens=20, compile=True), model.generate(ids[:, :5], 20))


def test_compile_refuses_padding():
    model = _model("tiny-gpt2")
    ids = torch.randint(0, 512, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, max_new_tokens=3, attention_mask=mask, compile=True)


def test_compile_refuses_beam_search():
    with pytest.raises(ValueError, match="beam search"):
        _model("tiny-gpt2").generate(torch.randint(0, 512, (1, 4)), max_new_tokens=3, num_beams=2, compile=True)
