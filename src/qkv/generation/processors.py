"""Logits processors: pure functions of (logits [B, V], input_ids [B, T]) -> logits [B, V].

Filtered-out tokens get -inf, so they can never be sampled. The order `build_processors` uses
(penalties, temperature, top-k, top-p, min-p) is the one HF `transformers` applies.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def temperature_scale(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by the temperature (> 0): below 1 sharpens, above 1 flattens."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (ties at the k-th value are kept)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, input_ids: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of top tokens with mass >= p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the mass before it already reaches p; the top token always stays.
    drop = (probs.cumsum(dim=-1) - probs) >= p
    drop[..., 0] = False
    remove = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, input_ids: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens with prob < min_p * (top token's prob)."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def repetition_penalty(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019) as HF defines it: for every token already in
    input_ids, a positive logit is divided by `penalty` and a negative one multiplied by it."""
    seen = logits.gather(-1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, input_ids, seen)


def frequency_presence_penalty(
    logits: torch.Tensor, input_ids: torch.Tensor, frequency: float, presence: float, prompt_len: int
) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far (not the prompt):
    logit[j] -= count[j] * frequency + (count[j] > 0) * presence."""
    generated = input_ids[:, prompt_len:]
    counts = torch.zeros_like(logits).scatter_add_(-1, generated, torch.ones_like(generated, dtype=logits.dtype))
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def typical_filter(logits: torch.Tensor, input_ids: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2023): keep the tokens whose surprisal is closest to
    the distribution's entropy, until their mass reaches `mass`."""
    logp = logits.log_softmax(dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num().sum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    order = torch.sort(shifted, dim=-1).indices
    sorted_probs = probs.gather(-1, order)
    drop = (sorted_probs.cumsum(-1) - sorted_probs) >= mass
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def build_processors(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition: float | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    typical_p: float | None = None,
    prompt_len: int = 0,
) -> list[LogitsProcessor]:
    """The processor list for a set of sampling options (None/neutral values add nothing).

    temperature=0 means greedy decoding: the sampling filters are left out.
    """
    procs: list[LogitsProcessor] = []
    if repetition is not None and repetition != 1.0:
        procs.append(partial(repetition_penalty, penalty=repetition))
    if frequency_penalty or presence_penalty:
        procs.append(
            partial(
                frequency_presence_penalty,
                frequency=frequency_penalty,
                presence=presence_penalty,
                prompt_len=prompt_len,
            )
        )
    if temperature == 0.0:
        return procs  # greedy: only the penalties change the argmax; sampling filters would not
    if temperature != 1.0:
        procs.append(partial(temperature_scale, temperature=temperature))
    if top_k:
        procs.append(partial(top_k_filter, k=top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(partial(top_p_filter, p=top_p))
    if min_p:
        procs.append(partial(min_p_filter, min_p=min_p))
    if typical_p is not None and typical_p < 1.0:
        procs.append(partial(typical_filter, mass=typical_p))
    return procs
