"""T5 span corruption and BART denoising: their statistics and layouts, as the papers specify them."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qkv.training import corruption
from qkv.training.corruption import (
    denoising,
    infilling_spans,
    sentence_permutation,
    span_corruption,
    span_noise_mask,
    text_infilling,
)

SENTINELS = list(range(999, 899, -1))  # <extra_id_0> is the last id of T5's vocabulary, and so on down
EOS, MASK = 1, 4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_span_noise_mask_has_the_specified_density_and_span_count():
    """15% noise in round(noise / 3) spans, alternating with non-noise runs that come first."""
    lengths = []
    for seed in range(200):
        mask = span_noise_mask(500, gen(seed))
        assert sum(mask) == 75 and not mask[0]
        runs = [len(list(g)) for _, g in itertools.groupby(mask)]
        noise_runs = runs[1::2]
        assert len(noise_runs) == 25 and all(r >= 1 for r in runs)
        lengths += noise_runs
    assert sum(lengths) / len(lengths) == 3.0  # mean span length exactly 75 / 25
    assert len(set(lengths)) > 5  # span lengths vary (a random partition), they are not all 3


def test_the_papers_example(monkeypatch):
    """Raffel et al. 2020, Figure 2: "Thank you <X> me to your party <Y> week." -> "<X> for inviting <Y> last <Z>"."""
    words = ["Thank", "you", "for", "inviting", "me", "to", "your", "party", "last", "week", "."]
    ids = list(range(10, 10 + len(words)))
    noise = [w in ("for", "inviting", "last") for w in words]
    monkeypatch.setattr(corruption, "span_noise_mask", lambda *a, **k: noise)
    inputs, targets = span_corruption(ids, SENTINELS, EOS, gen(0))
    X, Y, Z = SENTINELS[:3]
    name = dict(zip(ids, words, strict=True)) | {X: "<X>", Y: "<Y>", Z: "<Z>", EOS: "</s>"}
    assert " ".join(name[i] for i in inputs) == "Thank you <X> me to your party <Y> week . </s>"
    assert " ".join(name[i] for i in targets) == "<X> for inviting <Y> last <Z> </s>"


@pytest.mark.parametrize("seed", range(20))
def test_inputs_and_targets_rebuild_the_text(seed):
    ids = torch.randint(5, 800, (int(torch.randint(8, 300, (1,), generator=gen(seed))),), generator=gen(seed)).tolist()
    inputs, targets = span_corruption(ids, SENTINELS, EOS, gen(seed))
    assert inputs[-1] == targets[-1] == EOS
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1]:
        if token in SENTINELS:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    rebuilt = [t for token in inputs[:-1] for t in (spans[token] if token in SENTINELS else [token])]
    assert rebuilt == ids
    used = [t for t in targets if t in SENTINELS]
    assert used == SENTINELS[: len(used)] and spans[used[-1]] == []  # in order, closed by an empty sentinel


def test_infilling_span_lengths_are_poisson_3():
    lengths = [n for seed in range(300) for n in infilling_spans(1000, gen(seed))[:-1]]  # the last one is cut
    mean = sum(lengths) / len(lengths)
    assert abs(mean - 3.0) < 4 * math.sqrt(3.0 / len(lengths))  # Poisson: variance = mean = 3
    zeros = sum(n == 0 for n in lengths) / len(lengths)
    p0 = math.exp(-3.0)
    assert abs(zeros - p0) < 4 * math.sqrt(p0 * (1 - p0) / len(lengths))  # zero-length spans occur


@pytest.mark.parametrize("seed", range(20))
def test_text_infilling_hides_exactly_the_ratio_with_one_mask_per_span(seed):
    ids = list(range(100, 400))
    spans = infilling_spans(len(ids), gen(seed))
    out = text_infilling(ids, MASK, gen(seed))
    kept = [t for t in out if t != MASK]
    assert len(kept) == len(ids) - round(len(ids) * 0.3)
    assert out.count(MASK) == len(spans)  # one mask per span, zero-length spans included
    it = iter(ids)
    assert all(t in it for t in kept)  # what is kept stays in order


def test_sentence_permutation_shuffles_whole_sentences():
    s1, s2, s3 = [10, 11, 2], [20, 2], [30, 31, 32, 2]
    seen = set()
    for seed in range(30):
        out = sentence_permutation(s1 + s2 + s3, [2], gen(seed))
        assert sorted([tuple(s1), tuple(s2), tuple(s3)]) == sorted(
            tuple(out[i : j + 1]) for i, j in zip([0, *[k + 1 for k, t in enumerate(out) if t == 2][:-1]],
                                                   [k for k, t in enumerate(out) if t == 2], strict=True)
        )  # fmt: skip
        seen.add(tuple(out))
    assert len(seen) == 6  # every order of three sentences occurs


def test_denoising_target_is_the_original_text():
    ids = [*range(10, 60), 2, *range(60, 90), 2]
    inputs, targets = denoising(ids, MASK, EOS, gen(3), sentence_end_ids=[2])
    assert targets == [*ids, EOS] and inputs[-1] == EOS and MASK in inputs


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        span_noise_mask(1, gen(0))
    with pytest.raises(ValueError, match="noise_density"):
        span_noise_mask(100, gen(0), noise_density=1.5)
    with pytest.raises(ValueError, match="sentinel ids"):
        span_corruption(list(range(10, 200)), SENTINELS[:3], EOS, gen(0))
