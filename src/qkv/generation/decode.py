"""The decode loop: prefill the prompt into a KV cache, then one token per step.

`prefill` and `decode_one_token` are small free functions (as in gpt-fast) so the per-token step
stays lean and can be compiled; `generate` strings them together for greedy and sampled decoding,
batched with left padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qkv.generation.processors import LogitsProcessor, build_processors
from qkv.generation.sampling import sample_next_token

if TYPE_CHECKING:
    from qkv.cache import KVCache


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] that skip left padding: 0 at each row's first real token."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: KVCache,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompt [B, T] through the model, filling the cache; return last-position logits [B, V]."""
    position_ids = positions_from_mask(attention_mask) if attention_mask is not None else None
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, logits_to_keep=1)
    return out.logits[:, -1]


def decode_one_token(
    model: torch.nn.Module,
    token: torch.Tensor,
    cache: KVCache,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one token per row (token: [B]) at the cache's next slot; return logits [B, V]."""
    position_ids = None
    if attention_mask is not None:
        position_ids = positions_from_mask(attention_mask)[:, -1:]
    out = model(token[:, None], attention_mask=attention_mask, position_ids=position_ids, cache=cache)
    return out.logits[:, -1]


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy decoding)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 or None disables it)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    processors: list[LogitsProcessor] | None = None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` after input_ids [B, T] -> [B, T + n] (n <= max_new_tokens).

    temperature=0 is greedy (argmax); otherwise tokens are sampled after the processors
    (repetition penalty, temperature, top-k, top-p, min-p). `seed` makes sampling reproducible.
    Rows that emitted an EOS id are padded with `pad_token_id` (default: the first EOS id) until
    every row has finished. Generation stops early at the model's context length.
    Left-padded batches pass `attention_mask` [B, T]; each row then equals generating it alone.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    cfg = model.config
    B, T = input_ids.shape
    limit = cfg.context_limit
    if limit is not None and limit < T:
        raise ValueError(f"prompt of {T} tokens is longer than the model's context of {limit}; shorten the prompt")
    if T == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. the BOS token)")
    greedy = temperature == 0.0
    if processors is None:
        processors = build_processors(
            temperature=1.0 if greedy else temperature, top_k=None if greedy else top_k,
            top_p=None if greedy else top_p, min_p=None if greedy else min_p, repetition=repetition_penalty,
        )  # fmt: skip
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    eos = torch.tensor(
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        dtype=torch.long,
        device=input_ids.device,
    )
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: take the mask-free fast path
    n_new = max_new_tokens if limit is None else min(max_new_tokens, limit - T)
    cache = model.new_cache(B, T + n_new)

    tokens = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = prefill(model, input_ids, cache, attention_mask)
    for step in range(n_new):
        for proc in processors:
            logits = proc(logits, tokens)
        nxt = sample_next_token(logits, generator, greedy=greedy)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        if len(eos):
            finished |= torch.isin(nxt, eos)
            if bool(finished.all()):
                break
        if step == n_new - 1:
            break
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, 1)), dim=1)
        logits = decode_one_token(model, nxt, cache, attention_mask)
    return tokens
