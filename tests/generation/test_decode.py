"""Decoding against Hugging Face `generate`, and the loop's own promises."""

from __future__ import annotations

import pytest
import torch

from qkv import DecoderLM, ModelConfig
from qkv.generation import generate
from tiny_models import random_ids


@pytest.mark.parametrize("new", [24])
def test_greedy_equals_hf_generate(hf_pair, new):
    name, hf, model = hf_pair
    ids = random_ids(model.config.vocab_size, 1, 10, seed=3)
    eos = model.config.eos_token_id
    ref = hf.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    ours = model.generate(ids, max_new_tokens=new, eos_token_id=eos)
    assert ours.tolist() == ref.tolist(), name


def test_batched_left_padding_equals_one_by_one():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-mistral", sliding_window=6)).eval()
    rows = [random_ids(512, 1, n, seed=n)[0] for n in (3, 9, 6)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    batched = generate(model, ids, max_new_tokens=12, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = generate(model, r[None], max_new_tokens=12)
        assert batched[i, width:].tolist() == alone[0, len(r) :].tolist()


def test_sampling_is_reproducible_with_seed():
    model = DecoderLM(ModelConfig.from_name("tiny-llama")).eval()
    ids = random_ids(512, 2, 5, seed=3)
    a = generate(model, ids, max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    b = generate(model, ids, max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    c = generate(model, ids, max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_is_greedy():
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2")).eval()
    ids = random_ids(512, 1, 4, seed=3)
    assert torch.equal(generate(model, ids, 8, temperature=1.3, top_k=1, seed=0), generate(model, ids, 8))


def test_eos_stops_and_pads():
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2")).eval()
    ids = random_ids(512, 2, 4, seed=3)
    free = generate(model, ids, 6)[0].tolist()
    first = next(j for j in range(4, 10) if free[j] not in free[:j])  # a token row 0 emits first at j
    eos = free[first]
    out = generate(model, ids, 6, eos_token_id=eos, pad_token_id=0)
    assert out[0, : first + 1].tolist() == free[: first + 1]
    assert (out[0, first + 1 :] == 0).all()


def test_stops_at_context_limit():
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2", max_seq_len=16)).eval()
    out = generate(model, random_ids(512, 1, 10, seed=3), max_new_tokens=50)
    assert out.shape == (1, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
    ],
)
def test_bad_options_raise(kwargs, match):
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2")).eval()
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, random_ids(512, 1, 3, seed=3), **kwargs)


def test_prompt_longer_than_context_raises():
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2", max_seq_len=8)).eval()
    with pytest.raises(ValueError, match="context"):
        generate(model, random_ids(512, 1, 9, seed=3), max_new_tokens=2)
