"""Noise for encoder-decoder pre-training: T5's span corruption and BART's denoising.

Each function takes one token sequence (a list of ids, without EOS) and a seeded
`torch.Generator`, and returns (encoder input, decoder target) lists, so a collator can apply it
row by row and exact resume keeps working (the generator's state is all the randomness).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from qkv.errors import UsageError


def _random_partition(total: int, parts: int, generator: torch.Generator) -> list[int]:
    """`total` split into `parts` positive integers, every such split equally likely (stars and bars)."""
    if parts == 1:
        return [total]
    cuts = (torch.randperm(total - 1, generator=generator)[: parts - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(bounds)]


def span_noise_mask(
    length: int, generator: torch.Generator, noise_density: float = 0.15, mean_span_length: float = 3.0
) -> list[bool]:
    """Which of `length` positions are noise, in spans (Raffel et al. 2020, §3.1.4).

    round(length * noise_density) noise tokens fall in round(noise / mean_span_length) spans (at
    least one); the noise and non-noise runs have random lengths and alternate, starting with a
    non-noise run, as in the reference implementation (`random_spans_noise_mask`).
    """
    if length < 2:
        raise UsageError(f"span corruption needs at least 2 tokens, got {length}")
    if not 0.0 < noise_density < 1.0 or mean_span_length < 1.0:
        raise UsageError(f"noise_density={noise_density} must be in (0, 1), mean_span_length={mean_span_length} >= 1")
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(min(round(n_noise / mean_span_length), n_noise, length - n_noise), 1)
    noise = _random_partition(n_noise, n_spans, generator)
    keep = _random_partition(length - n_noise, n_spans, generator)
    mask: list[bool] = []
    for k, n in zip(keep, noise, strict=True):
        mask += [False] * k + [True] * n
    return mask


def span_corruption(
    ids: Sequence[int],
    sentinel_ids: Sequence[int],
    eos_id: int,
    generator: torch.Generator,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> tuple[list[int], list[int]]:
    """T5's objective: each noise span becomes one sentinel in the input; the target lists each
    sentinel followed by the span it hid, then a final sentinel; both end with EOS.

    "Thank you for inviting me to your party last week." ->
    input "Thank you <X> me to your party <Y> week.", target "<X> for inviting <Y> last <Z>".
    sentinel_ids: <extra_id_0>, <extra_id_1>, ... (T5's vocabulary ends with them, in reverse).
    """
    mask = span_noise_mask(len(ids), generator, noise_density, mean_span_length)
    inputs: list[int] = []
    targets: list[int] = []
    spans = 0
    for i, (token, noisy) in enumerate(zip(ids, mask, strict=True)):
        starts = i == 0 or mask[i - 1] != noisy
        if starts and noisy:
            if spans >= len(sentinel_ids):
                raise UsageError(f"{spans + 1} noise spans need more than the {len(sentinel_ids)} sentinel ids given")
            inputs.append(sentinel_ids[spans])
            targets.append(sentinel_ids[spans])
            spans += 1
        (targets if noisy else inputs).append(token)
    if spans >= len(sentinel_ids):
        raise UsageError(f"the closing sentinel needs more than the {len(sentinel_ids)} sentinel ids given")
    return [*inputs, eos_id], [*targets, sentinel_ids[spans], eos_id]


def infilling_spans(n_tokens: int, generator: torch.Generator, mask_ratio: float = 0.3, poisson_lambda: float = 3.0):
    """Span lengths drawn from Poisson(poisson_lambda) until they cover round(n * mask_ratio) tokens
    (the last one shortened to fit), as fairseq's BART draws them; zero-length spans included."""
    budget = round(n_tokens * mask_ratio)
    lengths: list[int] = []
    rate = torch.tensor([float(poisson_lambda)])
    while sum(lengths) < budget:
        lengths.append(int(torch.poisson(rate, generator=generator)))
    if lengths:
        lengths[-1] -= sum(lengths) - budget
    return lengths


def text_infilling(
    ids: Sequence[int],
    mask_id: int,
    generator: torch.Generator,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
) -> list[int]:
    """BART's text infilling (Lewis et al. 2020, §2.2): spans with Poisson(poisson_lambda) lengths,
    together exactly round(n * mask_ratio) tokens, each replaced by one mask token; a zero-length
    span inserts a mask. Spans never overlap: each is placed in a random gap between kept tokens
    (several may share a gap), so the model must infer how many tokens each mask hid."""
    lengths = infilling_spans(len(ids), generator, mask_ratio, poisson_lambda)
    kept = len(ids) - sum(lengths)
    gaps = torch.randint(0, kept + 1, (len(lengths),), generator=generator).tolist()
    by_gap: dict[int, list[int]] = {}
    for gap, length in zip(gaps, lengths, strict=True):
        by_gap.setdefault(gap, []).append(length)
    out: list[int] = []
    pos = 0
    for gap in range(kept + 1):
        for length in by_gap.get(gap, ()):
            out.append(mask_id)
            pos += length
        if gap < kept:
            out.append(ids[pos])
            pos += 1
    return out


def sentence_permutation(ids: Sequence[int], sentence_end_ids: Sequence[int], generator: torch.Generator) -> list[int]:
    """BART's sentence permutation: split after each sentence-ending token and shuffle the sentences."""
    ends = set(sentence_end_ids)
    sentences: list[list[int]] = [[]]
    for token in ids:
        sentences[-1].append(token)
        if token in ends:
            sentences.append([])
    sentences = [s for s in sentences if s]
    order = torch.randperm(len(sentences), generator=generator).tolist()
    return [token for k in order for token in sentences[k]]


def denoising(
    ids: Sequence[int],
    mask_id: int,
    eos_id: int,
    generator: torch.Generator,
    sentence_end_ids: Sequence[int] = (),
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
) -> tuple[list[int], list[int]]:
    """BART's objective: the input is the text with its sentences permuted (when sentence_end_ids
    are given) and then infilled; the target is the original text. Both end with EOS."""
    noisy = sentence_permutation(ids, sentence_end_ids, generator) if sentence_end_ids else list(ids)
    return [*text_infilling(noisy, mask_id, generator, mask_ratio, poisson_lambda), eos_id], [*ids, eos_id]
