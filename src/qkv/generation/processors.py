"""Logits processors: pure functions of (logits [B, V], input_ids [B, T]) -> logits [B, V].

Each option keeps the name it has in `GenerationConfig` (`repetition_penalty`, `top_p`, ...).

Filtered-out tokens get -inf, so they can never be sampled. The order `build_processors` uses
(penalties, temperature, top-k, top-p, min-p) is the one HF `transformers` applies.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from qkv.generation.options import GenerationConfig

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def temperature_scale(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by the temperature (> 0): below 1 sharpens, above 1 flattens."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, input_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k highest logits of each row (ties at the k-th value are kept)."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, input_ids: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of top tokens with mass >= top_p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the mass before it already reaches top_p; the top token always stays.
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
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


def typical_filter(logits: torch.Tensor, input_ids: torch.Tensor, typical_p: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2023): keep the tokens whose surprisal is closest to
    the distribution's entropy, until their mass reaches `typical_p`."""
    logp = logits.log_softmax(dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num().sum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    order = torch.sort(shifted, dim=-1).indices
    sorted_probs = probs.gather(-1, order)
    drop = (sorted_probs.cumsum(-1) - sorted_probs) >= typical_p
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def build_processors(config: GenerationConfig, prompt_len: int = 0) -> list[LogitsProcessor]:
    """The processor list for a set of decoding options (None/neutral values add nothing).

    temperature=0 means greedy decoding: the sampling filters are left out (they cannot change
    the argmax). prompt_len: where the generated tokens start (OpenAI's penalties count only those).
    """
    procs: list[LogitsProcessor] = []
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        procs.append(partial(repetition_penalty, penalty=config.repetition_penalty))
    if config.frequency_penalty or config.presence_penalty:
        procs.append(
            partial(
                frequency_presence_penalty,
                frequency=config.frequency_penalty,
                presence=config.presence_penalty,
                prompt_len=prompt_len,
            )
        )
    if config.greedy:
        return procs  # only the penalties change the argmax; sampling filters would not
    if config.temperature != 1.0:
        procs.append(partial(temperature_scale, temperature=config.temperature))
    if config.top_k:
        procs.append(partial(top_k_filter, top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        procs.append(partial(top_p_filter, top_p=config.top_p))
    if config.min_p:
        procs.append(partial(min_p_filter, min_p=config.min_p))
    if config.typical_p is not None and config.typical_p < 1.0:
        procs.append(partial(typical_filter, typical_p=config.typical_p))
    return procs
