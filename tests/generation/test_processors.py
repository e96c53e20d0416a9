"""Logits processors: each filter's defining property, and equality with `transformers`' processors.

Differences from transformers 5.x, by design: qkv's filters take no `min_tokens_to_keep` (HF's
default 1 only matters above 1, for beam sampling; qkv's top-k/top-p/min-p/typical always keep the
top token anyway), and qkv's option checks reject top_p=0, which HF's `TopPLogitsWarper` accepts.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from qkv.generation.options import GenerationConfig
from qkv.generation.processors import (
    build_processors,
    frequency_presence_penalty,
    min_p_filter,
    repetition_penalty,
    temperature_scale,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

hf = pytest.importorskip("transformers.generation.logits_process")

V = 40


@pytest.fixture
def logits() -> torch.Tensor:
    """[6, V]: random rows, a peaked one, a flat one, and one with ties (qkv keeps ties at the cut)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, V, generator=g) * 2.5
    rows[3, 7] = 12.0  # peaked
    rows[4] = 0.5  # flat: every token tied
    rows[5, :10] = rows[5, :10].round()  # ties
    return rows


@pytest.fixture
def input_ids() -> torch.Tensor:
    """[6, 12] with repeated ids."""
    return torch.randint(0, V, (6, 12), generator=torch.Generator().manual_seed(1))


def kept(out: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(out)


def check_unchanged(out: torch.Tensor, logits: torch.Tensor) -> None:
    """Kept tokens keep their logit; the others are -inf."""
    assert torch.equal(out[kept(out)], logits[kept(out)])
    assert bool((out[~kept(out)] == float("-inf")).all())


@pytest.mark.parametrize("k", [1, 3, 10, V, V + 5])
def test_top_k_keeps_the_k_best_and_ties(logits, k):
    out = top_k_filter(logits, None, k)
    check_unchanged(out, logits)
    kth = logits.sort(dim=-1, descending=True).values[:, min(k, V) - 1 : min(k, V)]
    assert torch.equal(kept(out), logits >= kth)  # never outside the k best; ties with the k-th kept
    assert bool((kept(out).sum(-1) >= min(k, V)).all())


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_top_p_keeps_a_minimal_nucleus(logits, p):
    out = top_p_filter(logits, None, p)
    check_unchanged(out, logits)
    probs = logits.double().softmax(-1)
    for row_probs, row_kept in zip(probs, kept(out)):
        mass = row_probs[row_kept].sum().item()
        assert mass >= p - 1e-6
        least = row_probs[row_kept].min().item()
        assert mass - least < p + 1e-6  # minimal: without the least likely kept token, mass < p
        if (~row_kept).any():  # a nucleus: every kept token is at least as likely as every dropped one
            assert least >= row_probs[~row_kept].max().item()


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_threshold(logits, min_p):
    out = min_p_filter(logits, None, min_p)
    check_unchanged(out, logits)
    probs = logits.softmax(-1)
    assert torch.equal(kept(out), probs >= min_p * probs.max(-1, keepdim=True).values)


def typical_brute_force(row: torch.Tensor, mass: float) -> set[int]:
    """Meister et al. 2023, §4: order tokens by |surprisal - entropy|, keep the shortest prefix of
    that order whose probability reaches `mass`."""
    probs = row.double().softmax(-1).tolist()
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    order = sorted(range(len(probs)), key=lambda i: abs(-math.log(probs[i]) - entropy))
    keep, total = set(), 0.0
    for i in order:
        keep.add(i)
        total += probs[i]
        if total >= mass:
            break
    return keep


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.95])
def test_typical_against_brute_force(logits, mass):
    rows = logits[:4]  # no ties in |surprisal - entropy|: the order, and so the set, is unique
    out = typical_filter(rows, None, mass)
    check_unchanged(out, rows)
    for row, row_kept in zip(rows, kept(out)):
        assert set(row_kept.nonzero().flatten().tolist()) == typical_brute_force(row, mass)


def openai_penalties(logits, input_ids, prompt_len, frequency, presence):
    """OpenAI's formula (platform.openai.com/docs/advanced-usage, "Frequency and presence penalties"):
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, where c[j] counts
    token j among the tokens sampled so far."""
    out = logits.clone()
    for b, row in enumerate(input_ids.tolist()):
        for j, c in Counter(row[prompt_len:]).items():
            out[b, j] -= c * frequency + float(c > 0) * presence
    return out


@pytest.mark.parametrize(("frequency", "presence"), [(0.5, 0.0), (0.0, 1.5), (0.7, 0.3), (-0.4, 0.2)])
@pytest.mark.parametrize("prompt_len", [0, 5])
def test_frequency_presence_penalties_equal_openai(logits, input_ids, frequency, presence, prompt_len):
    out = frequency_presence_penalty(logits, input_ids, frequency, presence, prompt_len)
    torch.testing.assert_close(out, openai_penalties(logits, input_ids, prompt_len, frequency, presence))


# ----- against transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(logits, input_ids, penalty):
    ref = hf.RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    assert torch.equal(repetition_penalty(logits, input_ids, penalty), ref)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda x: temperature_scale(x, None, 0.7), hf.TemperatureLogitsWarper(0.7)),
        (lambda x: temperature_scale(x, None, 1.8), hf.TemperatureLogitsWarper(1.8)),
        (lambda x: top_k_filter(x, None, 1), hf.TopKLogitsWarper(1)),
        (lambda x: top_k_filter(x, None, 7), hf.TopKLogitsWarper(7)),
        (lambda x: top_k_filter(x, None, V + 3), hf.TopKLogitsWarper(V + 3)),
        (lambda x: min_p_filter(x, None, 0.1), hf.MinPLogitsWarper(0.1)),
        (lambda x: min_p_filter(x, None, 1.0), hf.MinPLogitsWarper(1.0)),
    ],
    ids=["temperature-0.7", "temperature-1.8", "top-k-1", "top-k-7", "top-k-past-vocab", "min-p-0.1", "min-p-1"],
)
def test_warpers_equal_transformers(logits, input_ids, ours, theirs):
    assert torch.equal(ours(logits), theirs(input_ids, logits.clone()))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99, 1.0])
def test_top_p_equals_transformers(logits, input_ids, p):
    # Rows without ties: which of two equal logits falls at the cut depends on the sort.
    rows = logits[:4]
    assert torch.equal(top_p_filter(rows, None, p), hf.TopPLogitsWarper(p)(input_ids[:4], rows.clone()))


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9])
def test_typical_equals_transformers(logits, input_ids, mass):
    rows = logits[:4]
    assert torch.equal(typical_filter(rows, None, mass), hf.TypicalLogitsWarper(mass)(input_ids[:4], rows.clone()))


def test_processor_chain_equals_transformers(logits, input_ids):
    # The order build_processors applies is transformers': penalty, temperature, top-k, top-p, min-p.
    chain = build_processors(GenerationConfig(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, repetition_penalty=1.2))
    ref = hf.LogitsProcessorList(
        [
            hf.RepetitionPenaltyLogitsProcessor(1.2),
            hf.TemperatureLogitsWarper(0.8),
            hf.TopKLogitsWarper(12),
            hf.TopPLogitsWarper(0.9),
            hf.MinPLogitsWarper(0.05),
        ]
    )
    rows, ids = logits[:4], input_ids[:4]
    ours = rows
    for proc in chain:
        ours = proc(ours, ids)
    assert len(chain) == 5
    assert torch.equal(ours, ref(ids, rows.clone()))


def test_neutral_options_add_no_processor():
    assert build_processors(GenerationConfig()) == []
    neutral = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, typical_p=1.0)
    assert build_processors(neutral) == []
