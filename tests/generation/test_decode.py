"""Decoding against Hugging Face `generate`, and the loop's own promises."""

from __future__ import annotations

import pytest
import torch

from qkv import DecoderLM, ModelConfig
from qkv.generation import generate
from qkv.generation.decode import start_decoding
from qkv.generation.static_step import StaticStep
from tiny_models import left_pad, random_ids, tiny_model


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


# -- chunked prefill: the prompt fed through the cache a chunk at a time ---------------------------
# A window of 8 is shorter than the prompts, so the cache is a ring and chunks overwrite it.
CHUNKED = {"rope": {}, "alibi": {"position": "alibi"}, "sliding-window": {"sliding_window": 8}}


@pytest.mark.parametrize("case", CHUNKED)
def test_chunked_prefill_equals_one_forward(case):
    """float32: the same last-position logits and greedy tokens, for a left-padded batch too."""
    model = tiny_model("tiny-llama", **CHUNKED[case])
    ids, mask = left_pad([random_ids(512, 1, n, seed=n)[0] for n in (37, 23, 30)])
    whole = start_decoding(model, ids, 4, mask, chunk=None)[1]
    tokens = generate(model, ids, max_new_tokens=12, attention_mask=mask, prefill_chunk=None)
    for chunk in (1, 5, 16, 64):
        torch.testing.assert_close(start_decoding(model, ids, 4, mask, chunk=chunk)[1], whole, atol=1e-5, rtol=1e-5)
        chunked = generate(model, ids, max_new_tokens=12, attention_mask=mask, prefill_chunk=chunk)
        assert chunked.tolist() == tokens.tolist(), chunk
    alone = random_ids(512, 1, 41, seed=1)
    assert generate(model, alone, max_new_tokens=12, prefill_chunk=6).tolist() == (
        generate(model, alone, max_new_tokens=12, prefill_chunk=None).tolist()
    )


def test_chunked_prefill_of_a_static_cache_and_of_beam_search():
    model = tiny_model("tiny-llama")
    ids = random_ids(512, 2, 33, seed=2)
    step = StaticStep(model)
    logits = [step.prefill(ids, step.new_cache(2, 40), chunk) for chunk in (None, 5)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    beams = [generate(model, ids, max_new_tokens=6, num_beams=3, prefill_chunk=c) for c in (None, 4)]
    assert beams[0].tolist() == beams[1].tolist()


def test_prefill_chunk_must_be_a_positive_integer():
    model = tiny_model("tiny-llama")
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match=r"prefill_chunk=.* must be an integer >= 1"):
            generate(model, random_ids(512, 1, 4, seed=0), max_new_tokens=2, prefill_chunk=bad)


def test_a_prompt_past_a_dynamic_ntk_models_trained_length_is_prefilled_whole():
    """Dynamic NTK's base follows the forward's length, so chunks would cache keys rotated with
    other bases than later queries use; such a prompt runs in one forward, as transformers does."""
    model = tiny_model("tiny-llama", max_seq_len=32, rope_scaling={"type": "dynamic", "factor": 2.0})
    ids = random_ids(512, 1, 45, seed=4)
    whole = model(ids).logits[:, -1]
    torch.testing.assert_close(start_decoding(model, ids, 4, chunk=8)[1], whole, atol=1e-5, rtol=1e-5)
    assert generate(model, ids, max_new_tokens=8, prefill_chunk=8).tolist() == (
        generate(model, ids, max_new_tokens=8, prefill_chunk=None).tolist()
    )
