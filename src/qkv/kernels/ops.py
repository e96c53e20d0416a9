"""The C kernels as torch operators, so that compiled graphs can call them (`torch.library`)."""

from __future__ import annotations

import ctypes

import torch

from qkv import kernels

NEEDS_LANES = 16  # attention.c takes head dims that are a multiple of this
_SINGLE_QUERY_ARGS = (ctypes.c_void_p,) * 5 + (ctypes.c_int64,) * 7 + (ctypes.c_float, ctypes.c_int)


@torch.compiler.assume_constant_result
def single_query_available() -> bool:
    """Whether `single_query_attention` can run here (decided once, outside any traced graph)."""
    return kernels.library("attention") is not None


def single_query_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: bfloat16 throughout, CPU, head dim a multiple of 16."""
    return (
        q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.shape[-1] % NEEDS_LANES == 0 and k.is_contiguous() and v.is_contiguous()
    )  # fmt: skip


@torch.library.custom_op("qkv::single_query_attention", mutates_args=())
def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of q [B, H, 1, hd] over k, v [B, KV, S, hd] (bfloat16) with an additive bias that
    broadcasts to [B, H, 1, S] -> [B, H, 1, hd], by `qkv/kernels/attention.c`."""
    B, H, _, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    q = q.contiguous()
    out = torch.empty(B, H, 1, hd, dtype=q.dtype)
    sb = sh = 0
    if bias is not None:
        bias = bias.float().expand(B, H, 1, S)
        if bias.stride(-1) != 1:
            bias = bias.contiguous()
        sb, sh = bias.stride(0), bias.stride(1)
    fn = kernels.function("attention", "qkv_single_query_bf16", _SINGLE_QUERY_ARGS)
    code = fn(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
        B, H, KV, S, hd, sb, sh, scale, torch.get_num_threads(),
    )  # fmt: skip
    if code:
        raise RuntimeError(f"qkv_single_query_bf16 failed ({code}) for q {tuple(q.shape)}, k {tuple(k.shape)}")
    return out


@single_query_attention.register_fake
def _(q, k, v, bias, scale):
    return q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])
