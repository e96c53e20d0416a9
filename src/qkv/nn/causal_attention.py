"""Causal self-attention on CPU as block-causal matmuls instead of the fused kernel, for a
bfloat16 prompt's prefill and for bfloat16 training steps.

On CPU, PyTorch's fused (flash) attention kernel runs these shapes at a fraction of the half
precision matmul's speed: SmolLM2's 512-token prefill spent 40% of its time in it, and at
nanoGPT's benchmark shape (batch 16, 4 heads, 256 tokens, head size 64) its forward + backward
took over twice as long as this explicit softmax(QK^T / sqrt(d)) V. `causal_attention` computes
it in query blocks of `BLOCK` rows: block i only multiplies against the keys up to its own end,
skipping most of the masked upper triangle (Dao et al. 2022's block skipping, without the online
softmax). The query heads that share a kv head go through one matmul, so K and V are never
expanded. The scores are float32, as in the fused kernel (bf16's 8 bits would move a peaked row's
weights by percents: `tests/nn/test_attention.py` and `test_causal_attention.py` check the error
stays near the fused kernel's); the weights are rounded to the inputs' dtype for their product
with V, as the fused kernel rounds them. A training step keeps each block's weights for the
backward pass, which runs on half-precision matrix products.

Where it is built (AVX-512 BF16), a prefill (no gradients) instead runs `qkv/kernels/causal_attention.c`,
the same arithmetic in one call: per tile of 32 query rows, float32 scores from vdpbf16ps, a
vectorized float32 softmax, bfloat16 weights and float32 sums with V, all in the core's cache.
It takes prompts of any length up to NATIVE_MAX_TOKENS (4.1-6.5x the fused kernel from 128 to
16,384 tokens on SmolLM2's shape, `benchmarks/prefill_attention.py`).

`python benchmarks/prefill_attention.py` (by prompt length) and `python benchmarks/train.py
--attention` (a training step's shape, by block size) time it against the fused kernel.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from qkv import kernels

# Query rows per block: smaller blocks skip more of the masked triangle, larger ones make longer
# matrix products; of 32, 64, 128 and 256, 64 was the fastest at T = 256, 128 within a few percent
# (benchmarks/train.py --attention).
BLOCK = 64
# The weights kept for backward, per call (B * H * T^2 / 2 elements): above this the fused
# kernel, which keeps none, is used.
MAX_SAVED_BYTES = 256 << 20
# A prefill (no grad) takes the blocks for prompts of this many tokens (benchmarks/prefill_attention.py
# prints both paths by length); above the upper bound a block's float32 scores grow past tens of MB.
PREFILL_MIN_TOKENS = int(os.environ.get("QKV_BLOCKED_ATTENTION_MIN", "256"))
PREFILL_MAX_TOKENS = int(os.environ.get("QKV_BLOCKED_ATTENTION_MAX", "4096"))
# Where the explicit path was measured to win: bfloat16 on CPU (the fused kernel's float32 speed is
# on a par; float16 matmuls on a CPU without AVX-512 FP16 were not measured, so they keep the kernel).
DTYPES = (torch.bfloat16,)
# A prefill runs in `qkv/kernels/causal_attention.c` where it is built, up to NATIVE_MAX_TOKENS (the
# longest measured: 4.1x the fused kernel at 16,384 tokens) (QKV_NATIVE_ATTENTION=0: the
# torch blocks instead, as `benchmarks/prefill_attention.py` compares them).
NATIVE = os.environ.get("QKV_NATIVE_ATTENTION", "1") != "0"
NATIVE_MAX_TOKENS = 16384


def causal_attention_fits(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    """Whether `causal_attention` should run a causal self-attention over q [B, H, T, hd] and
    k [B, KV, S, hd] on CPU in bfloat16 without dropout: either a training step (gradients
    wanted, S == T) with as many key as query heads whose kept weights stay under
    MAX_SAVED_BYTES, or a prefill (no gradients): in the C kernel up to NATIVE_MAX_TOKENS keys,
    the queries being the last T of S (a chunk after a KV cache's keys); else in the torch blocks
    for S == T from PREFILL_MIN_TOKENS to PREFILL_MAX_TOKENS tokens."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    if not (q.device.type == "cpu" and q.dtype in DTYPES and dropout_p == 0.0):
        return False
    if S < T or H % k.shape[1]:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return S == T and k.shape[1] == H and B * H * T * (T + BLOCK) // 2 * q.element_size() <= MAX_SAVED_BYTES
    if _native_fits(q):
        return S <= NATIVE_MAX_TOKENS
    return S == T and PREFILL_MIN_TOKENS <= T <= PREFILL_MAX_TOKENS


def _native_fits(q: torch.Tensor) -> bool:
    # Not inside a traced graph: the kernel is a ctypes call, which dynamo cannot trace.
    return (
        NATIVE and q.dtype == torch.bfloat16 and q.shape[-1] % 32 == 0 and not torch.compiler.is_compiling()
        and native_available()
    )  # fmt: skip


def _blocks(T: int) -> list[tuple[int, int]]:
    return [(start, min(start + BLOCK, T)) for start in range(0, T, BLOCK)]


def _forward_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, keep: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """q [B, H, T, hd], k/v [B, KV, T, hd] -> (out [B, H, T, hd], each block's weights
    [B, H, rows, keys] in v's dtype when `keep`)."""
    B, H, T, hd = q.shape
    kv = k.shape[1]
    G = H // kv
    qf = (q.float() * scale).view(B, kv, G, T, hd)
    kt = k.float().transpose(-2, -1)  # (B, KV, hd, T)
    out = torch.empty(B, kv, G, T, hd, dtype=q.dtype, device=q.device)
    above = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=q.device).triu_(1)
    kept = []
    for start, end in _blocks(T):
        rows = end - start
        scores = qf[:, :, :, start:end].reshape(B, kv, G * rows, hd) @ kt[..., :end]  # (B, KV, G*rows, end)
        scores = scores.view(B, kv, G, rows, end)
        scores[..., start:end].masked_fill_(above[:rows, :rows], float("-inf"))  # query start+i sees keys <= start+i
        weights = scores.softmax(dim=-1).to(v.dtype)
        out[:, :, :, start:end] = (weights.view(B, kv, G * rows, end) @ v[:, :, :end]).view(B, kv, G, rows, hd)
        if keep:
            kept.append(weights.view(B, H, rows, end))
    return out.view(B, H, T, hd), kept


class _BlockCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):
            # Contiguous heads, so that every block's slice is a view that batched matmul reads as is
            # (the projections' heads arrive transposed: a slice of them would be copied per block).
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out, probs = _forward_blocks(q, k, v, scale, keep=True)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, *probs)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, *probs = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(q.dtype).contiguous()
            dq = torch.empty_like(q)
            dk = torch.zeros_like(k)
            dv = torch.zeros_like(v)
            for (start, end), p in zip(_blocks(q.shape[2]), probs):
                g = grad_out[:, :, start:end]
                dv[:, :, :end] += p.transpose(-2, -1) @ g
                # Softmax backward: dS = P * (dP - rowsum(dP * P)).
                ds = torch._softmax_backward_data(g @ v[:, :, :end].transpose(-2, -1), p, -1, p.dtype)
                dq[:, :, start:end] = ds @ k[:, :, :end]
                dk[:, :, :end] += ds.transpose(-2, -1) @ q[:, :, start:end]
            dq.mul_(ctx.scale)
            dk.mul_(ctx.scale)
        return dq, dk, dv, None


_NATIVE_ARGS = (ctypes.c_void_p,) * 4 + (ctypes.c_int64,) * 6 + (ctypes.c_void_p, ctypes.c_float, ctypes.c_int)


@functools.cache
def native_available() -> bool:
    """Whether `qkv/kernels/causal_attention.c` is built here and this CPU has AVX-512 BF16."""
    lib = kernels.library("causal_attention")
    return lib is not None and bool(lib.qkv_causal_attention_simd())


def _native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The prefill's attention in one call of `qkv/kernels/causal_attention.c` (same arithmetic
    as `_forward_blocks`: float32 scores and softmax, bfloat16 weights, float32 sums).

    The kernel reads q, k and v through their strides (a fused projection's heads are views) and
    writes the output as [B, T, H, hd] memory, returned as the [B, H, T, hd] view of it, so that
    the output projection's `transpose(1, 2).reshape` copies nothing. k and v may hold more
    positions than q (S >= T): the queries are then the last T of them."""
    B, H, T, hd = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(B, T, H, hd, dtype=q.dtype, device=q.device).transpose(1, 2)
    strides = (ctypes.c_int64 * 12)(*(s for t in (q, k, v, out) for s in t.stride()[:3]))
    fn = kernels.function("causal_attention", "qkv_causal_attention_bf16", _NATIVE_ARGS)
    code = fn(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, k.shape[1], T, k.shape[2], hd, strides, scale,
        torch.get_num_threads(),
    )  # fmt: skip
    if code:
        raise RuntimeError(f"qkv_causal_attention_bf16 failed ({code}) for q {tuple(q.shape)}, k {tuple(k.shape)}")
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v for q [B, H, T, hd] and k, v [B, KV, T, hd] (KV divides
    H; KV == H where gradients are wanted) -> [B, H, T, hd], with autograd.

    The same result as `F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
    enable_gqa=True)` to the inputs' rounding; see the module docstring for when it is faster.
    Where the C kernel runs (no gradients, `causal_attention_fits`), k and v may hold S > T
    positions: the queries are then the last T (a prompt's chunk after a KV cache).
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    longer_keys = not grad and _native_fits(q) and k.dim() == 4 and k.shape[2] > q.shape[2]
    if (
        q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]
        or (k.shape[2] != q.shape[2] and not longer_keys)
    ):  # fmt: skip
        raise ValueError(
            f"causal_attention needs q [B, H, T, hd] and k, v [B, KV, T, hd] (or [B, KV, S > T, hd] where the "
            f"C kernel runs), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] or (grad and k.shape[1] != q.shape[1]):
        raise ValueError(
            f"causal_attention: {q.shape[1]} query heads over {k.shape[1]} key/value heads; "
            + ("expand grouped key/value heads first to train through it" if grad else "KV must divide H")
        )
    if grad:
        return _BlockCausalAttention.apply(q, k, v, scale)
    with torch.no_grad():
        if _native_fits(q):
            return _native(q, k, v, scale)
        return _forward_blocks(q, k, v, scale, keep=False)[0]
