"""Beam search against Hugging Face `generate(num_beams=k, do_sample=False)`, and its own promises."""

from __future__ import annotations

import pytest
import torch

from oracle import shared_pair
from qkv import DecoderLM, ModelConfig
from qkv.generation import GenerationConfig, generate
from qkv.generation.beam import ban_repeated_ngrams, beam_search
from tiny_models import random_ids

NEW = 12


# (model, num_beams, eos_in_reach, options). "mistral-window-8" has a window shorter than prompt + output.
CASES = [
    ("gpt2", 3, True, {}),
    ("gpt2", 2, True, dict(early_stopping="never", length_penalty=1.5)),
    ("gpt2", 4, False, dict(no_repeat_ngram_size=2, early_stopping=True)),
    ("llama-gqa-6-2", 3, True, {}),
    ("llama-gqa-6-2", 4, True, dict(length_penalty=2.0)),
    ("llama-gqa-6-2", 3, True, dict(no_repeat_ngram_size=1)),
    ("mistral-window-8", 2, False, {}),
    ("mistral-window-8", 3, True, dict(length_penalty=0.5, early_stopping=True)),
    ("mistral-window-8", 4, True, dict(length_penalty=-1.0, early_stopping="never")),
]


@pytest.mark.parametrize(("name", "num_beams", "eos_in_reach", "options"), CASES)
def test_equals_hf_generate(name, num_beams, eos_in_reach, options):
    hf, model = shared_pair(name)
    ids = random_ids(model.config.vocab_size, 1, 7, seed=3)
    search = dict(num_beams=num_beams, max_new_tokens=NEW, num_return_sequences=num_beams, **options)
    free = generate(model, ids, eos_token_id=[], **search)
    # In reach: a token the best beam emits early without an EOS; out of reach: the model's EOS.
    eos = int(free[0, ids.shape[1] + 2]) if eos_in_reach else model.config.eos_token_id
    ours = generate(model, ids, eos_token_id=eos, pad_token_id=eos, **search)
    # Every returned hypothesis must match, not only the best one.
    assert ours.tolist() == hf.generate(ids, do_sample=False, eos_token_id=eos, pad_token_id=eos, **search).tolist()
    assert (ours.tolist() != free.tolist()) == eos_in_reach


@pytest.mark.parametrize("name", ["llama-gqa-6-2", "mistral-window-8"])
def test_left_padded_batch_equals_hf_generate(name):
    hf, model = shared_pair(name)
    rows = [random_ids(model.config.vocab_size, 1, n, seed=n)[0] for n in (4, 9, 6)]
    ids = torch.full((len(rows), 9), 5)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 9 - len(r) :], mask[i, 9 - len(r) :] = r, 1
    eos = model.config.eos_token_id
    kwargs = dict(num_beams=3, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=eos, attention_mask=mask,
                  num_return_sequences=2, length_penalty=0.7)  # fmt: skip
    assert generate(model, ids, **kwargs).tolist() == hf.generate(ids, do_sample=False, **kwargs).tolist()


def test_one_beam_without_eos_is_greedy():
    model = DecoderLM(ModelConfig.from_name("tiny-llama")).eval()
    ids = random_ids(512, 2, 5, seed=3)
    one_beam = beam_search(model, ids, GenerationConfig(max_new_tokens=10), n_new=10, eos=())
    assert torch.equal(one_beam, generate(model, ids, 10, eos_token_id=[]))


def test_cache_is_reordered_not_recomputed():
    """One prefill of the prompts, then exactly one token per beam row per step."""
    model = DecoderLM(ModelConfig.from_name("tiny-mistral", sliding_window=4)).eval()
    shapes: list[tuple[int, int]] = []
    model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    generate(model, random_ids(512, 2, 6, seed=3), num_beams=3, max_new_tokens=8, eos_token_id=[])
    assert shapes == [(2, 6)] + [(6, 1)] * 7


def test_stops_at_context_limit():
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2", max_seq_len=16)).eval()
    assert generate(model, random_ids(512, 1, 10, seed=3), 50, num_beams=2).shape == (1, 16)


def test_ban_repeated_ngrams():
    ids = torch.tensor([[1, 2, 3, 1, 2, 4, 1, 2]])  # "1 2" was followed by 3 and by 4
    banned = ban_repeated_ngrams(torch.zeros(1, 6), ids, 3).isinf()[0].nonzero().flatten().tolist()
    assert banned == [3, 4]
    assert ban_repeated_ngrams(torch.zeros(1, 6), ids, 1).isinf()[0].nonzero().flatten().tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_beams=0), "num_beams"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_return_sequences=3), "num_return_sequences"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    ],
)
def test_bad_options_raise(kwargs, match):
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2")).eval()
    kwargs = {"num_beams": 2, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, random_ids(512, 1, 3, seed=3), **kwargs)
