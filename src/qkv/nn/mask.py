"""Attention masks, built once per forward and shared by every layer of the same kind.

A mask is described by *slots*: the absolute index of each query and key in the sequence the
model has seen so far (with a KV cache, keys include earlier steps; a sliding-window ring holds
keys out of order, and unfilled ring slots are -1). From slots, a padding mask and an optional
position bias (ALiBi, T5) we build one additive float mask, or none at all when a fused kernel
can do without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMask:
    """What every layer of one kind needs: an additive bias [B|1, H|1, T, S] and/or a causal flag.

    `bias is None and not is_causal` means every query sees every key; `is_causal` with T queries
    and S >= T keys means the queries are the last T positions (query i sees keys <= S - T + i).
    """

    bias: torch.Tensor | None
    is_causal: bool = False


def build_attention_mask(
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    window: int | None = None,
    position_bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    static: bool = False,
) -> AttentionMask:
    """Combine causal, padding, sliding-window masks and a position bias into one `AttentionMask`.

    q_slots: [T] and k_slots: [S] absolute positions (-1 marks an empty key slot); q_slots [B, T]
    gives each row its own query slots (a static slot cache, one request per row), and needs static.
    attention_mask: [B, L] of 1 (attend) / 0 (padding) over absolute slots, L > max(k_slots).
    window: a query at slot i sees keys j with i - window < j <= i (HF/Mistral convention).
    position_bias: additive [B|1, H, T, S] (ALiBi, T5 relative buckets).
    static: always build the dense bias, reading no tensor values to choose a shortcut, so the
    result has the same shape at every decode step (the compiled, static-cache path).
    """
    if q_slots.dim() == 2:
        if not static:
            raise ValueError("per-row query slots q_slots [B, T] need static=True (a static slot cache)")
        return _per_row_mask(q_slots, k_slots, causal, attention_mask, window, position_bias, dtype)
    T, S = q_slots.numel(), k_slots.numel()
    if static:
        padded = attention_mask is not None
        needs_window = window is not None
    else:
        padded = attention_mask is not None and not bool(attention_mask.all())
        needs_window = window is not None and bool((q_slots.max() - k_slots.clamp(min=0).min()) >= window)
    empty_slots = not static and bool((k_slots < 0).any())
    if not static and not padded and not needs_window and not empty_slots and position_bias is None:
        if not causal:
            return AttentionMask(None)
        if T == S and torch.equal(q_slots, k_slots):
            return AttentionMask(None, is_causal=True)
        if bool((k_slots <= q_slots.min()).all()):
            return AttentionMask(None)  # e.g. one new token after a cache: it sees everything
        if (
            T < S
            and torch.equal(k_slots, torch.arange(S, device=k_slots.device))
            and torch.equal(q_slots, k_slots[S - T :])
        ):
            return AttentionMask(None, is_causal=True)  # a prompt's chunk after the keys cached before it
    allowed = (k_slots >= 0)[None, :].expand(T, S)  # -1 marks an empty ring slot
    if causal:
        allowed = allowed & (k_slots[None, :] <= q_slots[:, None])
    if needs_window:
        allowed = allowed & (q_slots[:, None] - k_slots[None, :] < window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if padded:
        keep = attention_mask.bool().gather(1, k_slots.clamp(min=0)[None, :].expand(attention_mask.shape[0], S))
        allowed = allowed & keep[:, None, None, :]  # (B, 1, T, S)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_slots.device)
    # finfo.min rather than -inf: a fully masked row (a padding query) then stays finite.
    bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
    if position_bias is not None:
        bias = bias + position_bias.to(dtype)
    return AttentionMask(bias)


def _per_row_mask(
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    causal: bool,
    attention_mask: torch.Tensor | None,
    window: int | None,
    position_bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> AttentionMask:
    """`build_attention_mask` for query slots [B, T] (row b's queries sit at q_slots[b]): a dense
    bias [B, 1, T, S], read from no tensor values, so a compiled step captures it once."""
    q = q_slots[:, :, None]  # (B, T, 1)
    k = k_slots[None, None, :]  # (1, 1, S)
    allowed = (k >= 0).expand(q.shape[0], q.shape[1], k.shape[-1])
    if causal:
        allowed = allowed & (k <= q)
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[:, None]  # (B, 1, T, S)
    if attention_mask is not None:
        keep = attention_mask.bool().gather(1, k_slots.clamp(min=0)[None, :].expand(attention_mask.shape[0], -1))
        allowed = allowed & keep[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_slots.device).masked_fill(~allowed, torch.finfo(dtype).min)
    if position_bias is not None:
        bias = bias + position_bias.to(dtype)
    return AttentionMask(bias)


def alibi_bias(slopes: torch.Tensor, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
    """ALiBi (Press et al. 2022): -slope_h * (i - j), as an additive bias [1, H, T, S] (q_slots [T])
    or [B, H, T, S] (per-row q_slots [B, T])."""
    if q_slots.dim() == 2:
        distance = (q_slots[:, :, None] - k_slots[None, None, :]).clamp(min=0).float()  # (B, T, S)
        return -(slopes[None, :, None, None] * distance[:, None])
    distance = (q_slots[:, None] - k_slots[None, :]).clamp(min=0).float()
    return -(slopes[:, None, None] * distance)[None]
