"""Beam search against Hugging Face `generate(do_sample=False)` on every combination of its options.

Slow: `make test-all` runs the sweep, `make test` only checks its size. Each case compares every
returned hypothesis of every prompt, token for token, on tiny random models with the same weights
in transformers and in qkv (tests/oracle.py), for 12 new tokens:

      3 models: GPT-2; LLaMA with GQA 6/2; Mistral with an 8-token window (shorter than prompt + output)
    x 3 num_beams: 2, 3, 4
    x 4 length_penalty: -1, 0, 1, 2
    x 3 early_stopping: True, False, "never"
    x 2 no_repeat_ngram_size: 0 (off), 2
    x 2 num_return_sequences: 1, num_beams
    x 3 eos_token_id: the model's own (rarely emitted by a random model); "early": the token that
        the same search without EOS puts third on its best beam, so hypotheses finish early; and
        both, as a list (more candidates per step, so that num_beams of them still run)
    x 2 prompts: one of 7 tokens; a left-padded batch of 4, 9 and 6 tokens with its attention_mask
    = 2,592 configurations (SWEEP_SIZE).

qkv is called as `model.generate(ids, max_new_tokens=..., num_beams=..., length_penalty=...,
early_stopping=..., no_repeat_ngram_size=..., num_return_sequences=..., eos_token_id=...,
attention_mask=...)`; HF gets the same keywords plus `do_sample=False` and `pad_token_id` = the
first EOS id (qkv's default pad).

The intentional differences from HF written in src/qkv/generation/beam.py do not show here:
- HF pads short hypotheses with the first EOS id when pad_token_id is 0; qkv uses pad_token_id
  whenever it is given. Here the pad is the EOS id on both sides (qkv's default), so the fill agrees.
- qkv prefills each prompt once and copies its cache to the beams (HF prefills every beam row): the
  same logits either way.
- qkv masks scores with -inf where HF uses -1e9: no returned hypothesis changes, as every case shows.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from oracle import shared_pair
from tiny_models import left_pad, random_ids

NEW = 12
GRID = {
    "name": ["gpt2", "llama-gqa-6-2", "mistral-window-8"],
    "num_beams": [2, 3, 4],
    "length_penalty": [-1.0, 0.0, 1.0, 2.0],
    "early_stopping": [True, False, "never"],
    "no_repeat_ngram_size": [0, 2],
    "returned": ["best", "all"],  # num_return_sequences: 1 or num_beams
    "eos": ["model", "early", "both"],
    "prompt": ["one", "left-padded"],
}
SWEEP_SIZE = math.prod(len(values) for values in GRID.values())
CASES = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]


def prompt(kind: str, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) for the two prompt kinds of the grid."""
    if kind == "one":
        ids = random_ids(vocab, 1, 7, seed=3)
        return ids, torch.ones_like(ids)
    return left_pad([random_ids(vocab, 1, n, seed=n)[0] for n in (4, 9, 6)])


@functools.cache
def early_eos(name: str, kind: str, num_beams: int, no_repeat_ngram_size: int) -> int:
    """The token that beam search without EOS puts third on the best beam of the first prompt."""
    _, model = shared_pair(name)
    ids, mask = prompt(kind, model.config.vocab_size)
    free = model.generate(ids, max_new_tokens=NEW, num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size,
                          eos_token_id=[], attention_mask=mask)  # fmt: skip
    return int(free[0, ids.shape[1] + 2])


def case_id(case: dict) -> str:
    return "-".join(f"{key}={value}" for key, value in case.items())


def test_the_sweep_has_the_size_the_docs_cite():
    assert SWEEP_SIZE == len(CASES) == 2592


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case_id(case) for case in CASES])
def test_equals_hf_generate(case):
    hf, model = shared_pair(case["name"])
    ids, mask = prompt(case["prompt"], model.config.vocab_size)
    num_beams, ngram = case["num_beams"], case["no_repeat_ngram_size"]
    eos = {
        "model": model.config.eos_token_id,
        "early": early_eos(case["name"], case["prompt"], num_beams, ngram),
        "both": [early_eos(case["name"], case["prompt"], num_beams, ngram), model.config.eos_token_id],
    }[case["eos"]]
    search = dict(
        max_new_tokens=NEW,
        num_beams=num_beams,
        length_penalty=case["length_penalty"],
        early_stopping=case["early_stopping"],
        no_repeat_ngram_size=ngram,
        num_return_sequences=num_beams if case["returned"] == "all" else 1,
        eos_token_id=eos,
        attention_mask=mask,
    )
    ours = model.generate(ids, **search)
    pad = eos[0] if isinstance(eos, list) else eos
    assert ours.tolist() == hf.generate(ids, do_sample=False, pad_token_id=pad, **search).tolist()
