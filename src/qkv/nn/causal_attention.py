"""Causal self-attention for training on CPU, as block-causal matmuls instead of the fused kernel.

On CPU, PyTorch's fused (flash) attention kernel is slow in bfloat16 training, its backward pass
above all: at nanoGPT's benchmark shape (batch 16, 4 heads, 256 tokens, head size 64) its forward
+ backward took over twice as long as this explicit softmax(QK^T / sqrt(d)) V. So when a training
step's attention is plain causal self-attention and its probabilities fit in memory,
`causal_attention` computes it in query blocks of `BLOCK` rows: block i only multiplies against
the keys up to its own end, skipping most of the masked upper triangle (Dao et al. 2022's block
skipping, without the online softmax: each block's probabilities are kept for the backward pass).
The scores are float32, as in the fused kernel (bf16's 8 bits would move a peaked row's weights by
percents); the weights are rounded to bf16 for their product with V, as `qkv.nn.attention`'s
prefill blocks round them, and kept so for the backward pass, which runs on bf16 matrix products.

`python benchmarks/train.py --attention` times it against the fused kernel, at several block sizes.
"""

from __future__ import annotations

import torch

# Query rows per block: smaller blocks skip more of the masked triangle, larger ones make longer
# matrix products; of 32, 64, 128 and 256, 64 was the fastest at T = 256, 128 within a few percent
# (benchmarks/train.py --attention).
BLOCK = 64
# The probabilities kept for backward, per call (B * H * T^2 / 2 elements): above this the fused
# kernel, which keeps none, is used.
MAX_SAVED_BYTES = 256 << 20
# Where the explicit path wins: bf16/fp16 on CPU (the fused kernel's float32 speed is on a par).
DTYPES = (torch.bfloat16, torch.float16)


def causal_attention_fits(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    """Whether `causal_attention` should run a causal self-attention over q [B, H, T, hd] and
    k [B, KV, T, hd]: a CPU training step (gradients wanted) in bf16/fp16, without dropout, with as
    many key as query heads, whose kept probabilities stay under MAX_SAVED_BYTES."""
    B, H, T, _ = q.shape
    return (
        q.device.type == "cpu"
        and q.dtype in DTYPES
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad)
        and dropout_p == 0.0
        and k.shape[1] == H
        and k.shape[2] == T
        and B * H * T * (T + BLOCK) // 2 * q.element_size() <= MAX_SAVED_BYTES
    )


def _blocks(T: int) -> list[tuple[int, int]]:
    return [(start, min(start + BLOCK, T)) for start in range(0, T, BLOCK)]


class _BlockCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):
            T = q.shape[2]
            # Contiguous heads, so that every block's slice is a view that batched matmul reads as is
            # (the projections' heads arrive transposed: a slice of them would be copied per block).
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            # Scores in float32, as the fused kernel keeps them: rounded to bf16's 8 bits, a score of
            # 20 would move by ~0.04, and a peaked row's weights with it.
            qf, kt = q.float() * scale, k.float().transpose(-2, -1)
            out = torch.empty_like(q)
            probs = []
            for start, end in _blocks(T):
                scores = qf[:, :, start:end] @ kt[..., :end]  # (B, H, rows, end)
                # In the diagonal square, query start + i sees keys up to start + i.
                upper = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu_(1)
                scores[..., start:end].masked_fill_(upper, float("-inf"))
                p = scores.softmax(dim=-1).to(v.dtype)  # rounded for the product with V, as in a prefill
                out[:, :, start:end] = p @ v[:, :, :end]
                probs.append(p)
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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v for q, k, v [B, H, T, hd] -> [B, H, T, hd], with autograd.

    The same result as `F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)` to
    the inputs' rounding; see the module docstring for when it is faster.
    """
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"causal_attention needs q, k and v of one shape [B, H, T, hd], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}; expand grouped key/value heads first"
        )
    return _BlockCausalAttention.apply(q, k, v, scale)
