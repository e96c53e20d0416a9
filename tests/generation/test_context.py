"""qkv.generation.context: a RoPE scaling put on a loaded model equals transformers' model built with
it, past the trained context; bad scalings and prompts past even the scaled context are refused."""

from __future__ import annotations

import pytest
import torch

from oracle import make_hf_model, qkv_from_hf, transformers
from qkv.errors import UsageError
from qkv.generation import RopeScaling, generate, scale_rope
from tiny_models import random_ids, tiny_model

TRAINED = 64  # the oracle LLaMA's max_position_embeddings


def hf_scaled(hf, kind: str, factor: float):
    """The same weights in a transformers LLaMA whose config carries the RoPE scaling."""
    params = {"rope_type": kind, "factor": factor, "rope_theta": 10000.0}
    if kind == "yarn":
        params["original_max_position_embeddings"] = TRAINED
    config = transformers.LlamaConfig(**{**hf.config.to_dict(), "rope_parameters": params})
    config._attn_implementation = "eager"
    scaled = transformers.LlamaForCausalLM(config).eval()
    scaled.load_state_dict(hf.state_dict())
    return scaled


@pytest.mark.parametrize("kind, factor", [("linear", 2.0), ("dynamic", 2.0), ("yarn", 2.0), ("yarn", 3.5)])
def test_scaled_model_equals_transformers_past_the_trained_context(kind, factor):
    hf = make_hf_model("llama-gqa-6-2")
    model = scale_rope(qkv_from_hf(hf), f"{kind}:{factor}")
    ref = hf_scaled(hf, kind, factor)
    ids = random_ids(97, 1, 100, seed=1)  # past the 64 trained positions
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    ours = generate(model, ids, max_new_tokens=10, eos_token_id=[])
    theirs = ref.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()
    assert model.config.context_limit == (None if kind == "dynamic" else int(TRAINED * factor))


def test_the_context_grows_by_the_factor_and_a_longer_prompt_is_refused_naming_both_lengths():
    model = tiny_model("tiny-llama", max_seq_len=32)
    ids = random_ids(512, 1, 40, seed=2)
    with pytest.raises(UsageError, match=r"prompt of 40 tokens leaves no room in the model's context of 32 \("):
        generate(model, ids, max_new_tokens=4)
    scale_rope(model, "yarn:2")
    assert generate(model, ids, max_new_tokens=4).shape == (1, 44)
    message = (
        r"prompt of 70 tokens leaves no room in the model's context of 64 \(32 trained, x2.0 by yarn RoPE scaling\)"
    )
    with pytest.raises(UsageError, match=message):
        generate(model, random_ids(512, 1, 70, seed=3), max_new_tokens=4)


def test_parse():
    assert RopeScaling.parse("yarn:4") == RopeScaling("yarn", 4.0)
    assert RopeScaling.parse(" Linear ") == RopeScaling("linear", 2.0)  # the default factor
    assert RopeScaling.parse("dynamic:1.5").context(8192) is None  # dynamic NTK has no fixed limit
    assert RopeScaling.parse("linear:2.5").context(8192) == 20480


@pytest.mark.parametrize(
    "text, message",
    [
        ("ntk:2", r"RoPE scaling 'ntk' is not known; choose one of: linear, dynamic, yarn"),
        ("llama3", r"'llama3' is not known"),
        ("yarn:x", r"factor 'x' is not a number; write e.g. yarn:2"),
        ("linear:0.5", r"factor 0.5 must be a finite number >= 1"),
        ("linear:inf", r"factor inf must be a finite number >= 1"),
        ("linear:nan", r"factor nan must be a finite number >= 1"),
        ("", r"RoPE scaling '' is not known"),
    ],
)
def test_a_bad_scaling_is_refused(text, message):
    with pytest.raises(UsageError, match=message):
        RopeScaling.parse(text)


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("tiny-gpt2", {}, r"position='learned', not RoPE"),
        ("tiny-llama", {"position": "alibi"}, r"position='alibi', not RoPE"),
        ("tiny-llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, r"already uses RoPE scaling"),
    ],
)
def test_a_model_that_cannot_take_a_scaling_is_refused(preset, overrides, message):
    model = tiny_model(preset, **overrides)
    with pytest.raises(UsageError, match=message):
        scale_rope(model, "linear:2")
    assert model.config == tiny_model(preset, **overrides).config  # left as it was
