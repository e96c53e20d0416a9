"""Multi-head attention: MHA, MQA and GQA; self and cross; `sdpa` and `eager` backends.

Backends are plain functions chosen by name. `sdpa` is PyTorch's fused kernel (memory-efficient,
the default); `eager` is the explicit softmax(QK^T * scale + bias) V of Vaswani et al. 2017 §3.2.1
and the one that returns the full attention weights. `attention_weights` computes the weights of
chosen query rows beside any backend, in O(rows x keys) memory (`weight_rows`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qkv.config import ModelConfig
from qkv.nn.causal_attention import causal_attention, causal_attention_fits
from qkv.nn.linear import Linear
from qkv.nn.mask import AttentionMask
from qkv.nn.position import apply_rotary

if TYPE_CHECKING:
    from qkv.cache import KVCache


def _eager(q, k, v, mask: AttentionMask, scale: float, dropout_p: float, need_weights: bool):
    weights = attention_weights(q, k, mask, scale)  # (B, H, T, S)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # GQA: each kv head serves n_rep query heads
        v = v.repeat_interleave(n_rep, dim=1)
    return weights @ v, (weights if need_weights else None)


# How many float32 scores `attention_weights` holds at a time when rows are chosen (16M: 64 MB).
WEIGHTS_CHUNK = 1 << 24


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, mask: AttentionMask, scale: float, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) in q's dtype: [B, H, T, S], or [B, H, R, S] for the query rows
    `rows` [R] (indices into T, >= 0) alone: the eager backend's weights, row for row.

    q: [B, H, T, hd], k: [B, KV, S, hd]. Query head h reads kv head h // (H / KV) (GQA), as
    `repeat_interleave` would give, without copying K. With rows, the scores are computed a chunk
    of rows at a time (at most `WEIGHTS_CHUNK` float32 scores), so memory is O(R x S), never O(T x S).
    """
    B, H, T, _ = q.shape
    S = k.shape[2]
    if rows is None:
        return _weight_rows(q, k, mask, scale, torch.arange(T, device=q.device), all_rows=True)
    out = torch.empty(B, H, rows.numel(), S, dtype=q.dtype, device=q.device)
    chunk = max(1, WEIGHTS_CHUNK // (B * H * S))
    for start in range(0, rows.numel(), chunk):
        out[:, :, start : start + chunk] = _weight_rows(q, k, mask, scale, rows[start : start + chunk])
    return out


def _causal_allowed(rows: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """[R, S]: the keys that query rows `rows` of a causal mask see, the T queries being the last
    T of the S keys (query t sees keys <= S - T + t)."""
    return torch.arange(S, device=rows.device)[None, :] <= (rows + (S - T))[:, None]


def _weight_rows(q, k, mask: AttentionMask, scale: float, rows: torch.Tensor, all_rows: bool = False):
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    R = rows.numel()
    qr = q if all_rows else q[:, :, rows]  # (B, H, R, hd)
    # The H / KV query heads of one kv head as one matrix: (B, KV, H/KV * R, hd) @ (B, KV, hd, S).
    scores = (qr.reshape(B, KV, H // KV * R, hd) @ k.transpose(-2, -1)).view(B, H, R, S).float() * scale
    if mask.bias is not None:
        bias = mask.bias  # (B|1, H|1, T|1, S)
        scores = scores + (bias if all_rows or bias.shape[-2] == 1 else bias[:, :, rows])
    if mask.is_causal:
        allowed = _causal_allowed(rows, T, S)  # (R, S)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1).to(q.dtype)


# From this many sequences on, a decode step's attention runs in `qkv/kernels/attention.c`: it skips
# the masked slots of a static cache and reads each cached row once for the heads that share it.
# Below it, the per-call overhead outweighs that (benchmarks/attention_step.py prints both by batch).
NATIVE_MIN_BATCH = 4


def _single_query(q, k, v, mask: AttentionMask, scale: float):
    # One new token per sequence (the decode step): group the query heads that share a kv head
    # into one matmul instead of expanding K/V; on CPU this beats the fused kernel's setup cost.
    # Small bf16 batched matmuls are slower on CPU than converting to float32 first.
    B, H, _, hd = q.shape
    kv = k.shape[1]
    if B >= NATIVE_MIN_BATCH and q.dtype == torch.bfloat16:
        from qkv.kernels import ops  # here, not at the top: it registers a torch op, which imports dynamo (~1 s)

        if ops.single_query_fits(q, k, v) and ops.single_query_available():
            return ops.single_query_attention(q, k, v, mask.bias, scale)
    if torch.compiler.is_compiling():
        # In a compiled step, as reductions that inductor fuses with the casts: the cache is read
        # once in its own dtype and accumulated in float32, never copied to float32 as a whole
        # (at batch 16 those copies were 180 MB a token on SmolLM2).
        qg = q.reshape(B, kv, H // kv, 1, hd).float()
        scores = (qg * k[:, :, None].float()).sum(-1) * scale  # (B, KV, H/KV, S)
        if mask.bias is not None:
            bias = mask.bias
            scores = scores + (bias.view(bias.shape[0], kv, H // kv, -1) if bias.shape[1] == H else bias)
        weights = scores.softmax(dim=-1)
        out = (weights[..., None] * v[:, :, None].float()).sum(-2)  # (B, KV, H/KV, hd)
        return out.to(q.dtype).view(B, H, 1, hd)
    scores = (q.reshape(B, kv, H // kv, hd).float() @ k.float().transpose(-2, -1)) * scale  # (B, KV, H/KV, S)
    if mask.bias is not None:
        bias = mask.bias  # (B|1, H|1, 1, S)
        scores = scores + (bias.view(bias.shape[0], kv, H // kv, -1) if bias.shape[1] == H else bias)
    weights = scores.softmax(dim=-1)
    return (weights @ v.float()).to(q.dtype).view(B, H, 1, hd)


def _sdpa(q, k, v, mask: AttentionMask, scale: float, dropout_p: float, need_weights: bool):
    if q.shape[2] == 1 and dropout_p == 0.0 and not mask.is_causal:
        return _single_query(q, k, v, mask, scale), None
    if mask.is_causal and mask.bias is None and causal_attention_fits(q, k, dropout_p):
        return causal_attention(q, k, v, scale), None  # a half-precision prefill or training step on CPU
    T, S = q.shape[2], k.shape[2]
    if mask.is_causal and T != S:  # torch's is_causal aligns the queries with the first keys, ours the last
        allowed = _causal_allowed(torch.arange(T, device=q.device), T, S)
        mask = AttentionMask(torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf")))
    bias = mask.bias.to(q.dtype) if mask.bias is not None else None
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=mask.is_causal, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )  # fmt: skip
    return out, None


BACKENDS: dict[str, Callable] = {"sdpa": _sdpa, "eager": _eager}


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "sdpa",
    need_weights: bool = False,
    weight_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over q: [B, H, T, hd], k/v: [B, KV, S, hd] (KV divides H) -> ([B, H, T, hd], weights).

    `need_weights=True` uses the eager backend and returns weights [B, H, T, S]; with
    `weight_rows` [R] (query indices in [0, T)) the output comes from `backend` as usual and the
    weights [B, H, R, S] of those rows alone are computed beside it (`attention_weights`; in
    training, before attention dropout, which the output still gets).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if mask is not None and mask.is_causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"AttentionMask(is_causal=True) needs at least as many keys as queries (the queries are the last "
            f"of the keys), got {q.shape[2]} queries and {k.shape[2]} keys; build the mask with build_attention_mask"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = mask or AttentionMask(None)
    if need_weights and weight_rows is not None:
        T = q.shape[2]
        if weight_rows.dim() != 1 or weight_rows.numel() == 0 or weight_rows.is_floating_point():
            raise ValueError(
                f"weight_rows must be a non-empty 1-D integer tensor, got shape {tuple(weight_rows.shape)}"
            )
        if int(weight_rows.min()) < 0 or int(weight_rows.max()) >= T:
            raise ValueError(f"weight_rows {weight_rows.tolist()} must lie in [0, {T}) for {T} queries")
        out, _ = BACKENDS[backend](q, k, v, mask, scale, dropout_p, False)
        return out, attention_weights(q, k, mask, scale, weight_rows)
    fn = BACKENDS["eager" if need_weights else backend]
    return fn(q, k, v, mask, scale, dropout_p, need_weights)


@dataclass
class AttentionInputs:
    """Per-forward state every attention layer reads: masks by layer kind, RoPE tables, cache."""

    masks: dict[str, AttentionMask] = field(default_factory=dict)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: [B, T, 1, rotary_dim]
    cache: KVCache | None = None
    input_pos: torch.Tensor | None = None  # [T] slots a static cache writes (see KVCache.slots)
    need_weights: bool = False
    weight_rows: torch.Tensor | None = None  # [R] query rows in [0, T) whose weights alone are returned
    weight_layers: frozenset[int] | None = None  # layer indices that return weights (None: all)
    key_limit: int | None = None  # attend to a static cache's first key_limit slots only (a prompt chunk)

    def wants_weights(self, layer_idx: int) -> bool:
        """Whether the layer `layer_idx` returns attention weights in this forward."""
        return self.need_weights and (self.weight_layers is None or layer_idx in self.weight_layers)

    def mask(self, kind: str) -> AttentionMask:
        """The mask for layers of `kind` ("full", "sliding", "cross"); an error when none was built."""
        if kind not in self.masks:
            raise ValueError(
                f"no attention mask of kind {kind!r} was built for this forward (have: {sorted(self.masks)}); "
                "the model must build one mask per layer kind, AttentionMask(None) for 'no mask'"
            )
        return self.masks[kind]


class Attention(nn.Module):
    """Q/K/V projections, optional RoPE, a backend, and the output projection.

    Self-attention keeps Q, K and V in one fused projection `qkv_proj` (one matmul per token);
    cross-attention has `q_proj` on the decoder stream and a fused `kv_proj` on the context.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, cross: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.cross = cross
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.backend = cfg.attn_backend
        self.attn_dropout = cfg.attn_dropout
        self.use_rope = cfg.position == "rope" and not cross
        self.kind = "sliding" if cfg.sliding_window and not cross else "full"
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        if cross:
            self.q_proj = Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
            self.kv_proj = Linear(cfg.d_model, 2 * kv_dim, bias=cfg.qkv_bias)
        else:
            self.qkv_proj = Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_dim, cfg.d_model, bias=cfg.attn_out_bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, hd)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, T, D] (context: [B, S, D] for cross-attention) -> ([B, T, D], weights or None)."""
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        cache = inputs.cache
        if self.cross:
            q = self._heads(self.q_proj(x), self.n_heads)
            kv = cache.cross_kv.get(self.layer_idx) if cache is not None else None
            if kv is None:
                k, v = self.kv_proj(context).split(kv_dim, dim=-1)
                kv = (self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads))
                if cache is not None:
                    cache.cross_kv[self.layer_idx] = kv
            k, v = kv
        else:
            B, T, _ = x.shape
            H, KV = self.n_heads, self.n_kv_heads
            qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, self.head_dim)
            if self.use_rope:  # rotate the query and key heads together, before splitting them
                cos, sin = inputs.rope
                q, k = apply_rotary(qkv[:, :, : H + KV], cos, sin).split((H, KV), dim=2)
                v = qkv[:, :, H + KV :]
            else:
                q, k, v = qkv.split((H, KV, KV), dim=2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v, inputs.input_pos)  # (B, KV, S, hd)
                if inputs.key_limit is not None:
                    k, v = k[:, :, : inputs.key_limit], v[:, :, : inputs.key_limit]
        mask = inputs.mask("cross" if self.cross else self.kind)
        out, weights = scaled_dot_product_attention(
            q, k, v, mask, scale=self.scale, dropout_p=self.attn_dropout if self.training else 0.0,
            backend=self.backend, need_weights=inputs.wants_weights(self.layer_idx), weight_rows=inputs.weight_rows,
        )  # fmt: skip
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, q_dim)), weights
