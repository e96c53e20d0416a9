"""Greedy speculative decoding: exactly the target's greedy tokens, fewer target forwards."""

from __future__ import annotations

import functools

import pytest
import torch

from oracle import make_hf_model, qkv_from_hf
from qkv import DecoderLM, ModelConfig
from qkv.generation import generate
from qkv.generation.speculative import speculative_generate
from qkv.models.decoder import early_exit_draft
from tiny_models import random_ids

NEW = 24


@functools.cache
def _models(name: str) -> dict[str, DecoderLM]:
    """A target and its drafts: itself, an unrelated random model, and its first layer."""
    target = qkv_from_hf(make_hf_model(name))
    return {
        "target": target,
        "same": target,
        "random": qkv_from_hf(make_hf_model(name, seed=1)),
        "first-layer": early_exit_draft(target, 1),
    }


@pytest.mark.parametrize("draft_kind", ["same", "random", "first-layer"])
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-6-2", "mistral-window-8"])  # Mistral: window 8 < 34 tokens
@pytest.mark.parametrize("k", [1, 4])
def test_equals_target_greedy(name, draft_kind, k):
    models = _models(name)
    target, draft = models["target"], models[draft_kind]
    ids = random_ids(target.config.vocab_size, 1, 10, seed=0)
    out, stats = speculative_generate(target, draft, ids, NEW, num_draft_tokens=k, eos_token_id=[])
    assert out.tolist() == generate(target, ids, NEW, eos_token_id=[]).tolist()
    assert 0 <= stats.accepted <= stats.proposed
    # Each round is one target forward yielding its accepted tokens plus one of the target's own.
    assert stats.target_forwards - 1 + stats.accepted == NEW - 1
    if draft_kind == "same":
        assert stats.acceptance_rate == 1.0
        assert stats.target_forwards <= 1 + -(-(NEW - 1) // (k + 1))


def test_hf_greedy_oracle():
    models = _models("llama-gqa-6-2")
    ids = random_ids(97, 1, 10, seed=0)
    hf = make_hf_model("llama-gqa-6-2")
    ref = hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=2, pad_token_id=2)
    out, _ = speculative_generate(models["target"], models["first-layer"], ids, NEW, eos_token_id=2)
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("draft_kind", ["same", "first-layer"])
def test_stops_at_eos_inside_an_accepted_run(draft_kind):
    models = _models("llama-gqa-6-2")
    target = models["target"]
    ids = random_ids(97, 1, 10, seed=0)
    free = generate(target, ids, NEW, eos_token_id=[])[0, 10:].tolist()
    eos = next(t for i, t in enumerate(free) if i >= 5 and t not in free[:i])  # first emitted at step i
    out, _ = speculative_generate(target, models[draft_kind], ids, NEW, num_draft_tokens=8, eos_token_id=eos)
    assert out.tolist() == generate(target, ids, NEW, eos_token_id=eos).tolist()
    assert out[0, -1] == eos


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_short_runs_and_context_limit(max_new_tokens):
    target = DecoderLM(ModelConfig.from_name("tiny-llama", max_seq_len=14)).eval()
    draft = early_exit_draft(target, 1)
    ids = random_ids(512, 1, 10, seed=0)
    out, _ = speculative_generate(target, draft, ids, max_new_tokens, num_draft_tokens=3, eos_token_id=[])
    assert out.tolist() == generate(target, ids, max_new_tokens, eos_token_id=[]).tolist()
    assert out.shape[1] == 10 + min(max_new_tokens, 4)


def test_early_exit_draft_shares_weights():
    target = DecoderLM(ModelConfig.from_name("tiny-gpt2", n_layers=3)).eval()
    draft = early_exit_draft(target, 2)
    assert draft.config.n_layers == 2 and len(draft.blocks) == 2
    assert draft.blocks[1] is target.blocks[1] and draft.lm_head.weight is target.lm_head.weight
    with pytest.raises(ValueError, match="n_layers"):
        early_exit_draft(target, 4)


@pytest.mark.parametrize(
    ("draft_cfg", "ids", "kwargs", "match"),
    [
        (dict(vocab_size=256), random_ids(256, 1, 4, seed=0), {}, "vocabulary"),
        ({}, torch.zeros(2, 4, dtype=torch.long), {}, r"\[1, T\]"),
        ({}, random_ids(512, 1, 4, seed=0), dict(num_draft_tokens=0), "num_draft_tokens"),
        ({}, random_ids(512, 1, 4, seed=0), dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_inputs_raise(draft_cfg, ids, kwargs, match):
    target = DecoderLM(ModelConfig.from_name("tiny-gpt2")).eval()
    draft = DecoderLM(ModelConfig.from_name("tiny-gpt2", n_layers=1, **draft_cfg)).eval()
    with pytest.raises(ValueError, match=match):
        speculative_generate(target, draft, ids, **{"max_new_tokens": 4, **kwargs})
