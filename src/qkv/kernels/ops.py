"""The C kernels as torch operators, so that compiled graphs can call them (`torch.library`):
`qkv::single_query_attention` (attention.c) and `qkv::int4_matmul` (int4_matmul.c). Each has a
fake implementation, so graphs trace, export and go through AOTInductor with them."""

from __future__ import annotations

import ctypes
import functools

import torch

from qkv import kernels

NEEDS_LANES = 16  # attention.c takes head dims that are a multiple of this
_SINGLE_QUERY_ARGS = (ctypes.c_void_p,) * 5 + (ctypes.c_int64,) * 7 + (ctypes.c_float, ctypes.c_int)


@kernels.constant_result
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


_INT4_MATMUL_ARGS = (ctypes.c_void_p,) * 4 + (ctypes.c_int64,) * 6 + (ctypes.c_int,)


@functools.cache
def _int4_matmul_built() -> bool:
    lib = kernels.library("int4_matmul")
    return lib is not None and bool(lib.qkv_int4_matmul_simd())


@functools.cache
def _int4_matmul_fn() -> ctypes._CFuncPtr:
    return kernels.function("int4_matmul", "qkv_int4_matmul_bf16", _INT4_MATMUL_ARGS)


@kernels.constant_result
def int4_matmul_available() -> bool:
    """Whether `int4_matmul` can run here: the kernel is built and this CPU has AVX-512 BF16
    (decided once, outside any traced graph)."""
    return _int4_matmul_built()


def int4_matmul_eager(
    x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """x [M, Kx] bfloat16 @ W^T -> [M, N] bfloat16, W [N, K] in torch's packed int4 CPU layout
    (`packed` uint8 [N, K / 2], `scales_and_zeros` bfloat16 [K / group, N, 2]), by
    `qkv/kernels/int4_matmul.c`. K may be a multiple of Kx: weight column k then multiplies
    x[:, k % Kx] (a group-wise int8 weight run as two int4 halves over [x | x]).

    Eager code calls this directly, without the `int4_matmul` operator's dispatch."""
    M, Kx = x.shape
    N, K = packed.shape[0], packed.shape[1] * 2
    if x.dtype != torch.bfloat16 or scales_and_zeros.dtype != torch.bfloat16 or packed.dtype != torch.uint8:
        raise ValueError(
            f"int4_matmul takes bfloat16 x and scales_and_zeros and a uint8 packed weight, got {x.dtype}, "
            f"{scales_and_zeros.dtype} and {packed.dtype}; cast the activations to bfloat16 first"
        )
    if tuple(scales_and_zeros.shape) != (K // group, N, 2) or not (
        packed.is_contiguous() and scales_and_zeros.is_contiguous()
    ):
        raise ValueError(
            f"scales_and_zeros must be a contiguous [{K // group}, {N}, 2] tensor for a weight [{N}, {K}] in "
            f"groups of {group}, got {tuple(scales_and_zeros.shape)}"
        )
    if x.stride(-1) != 1 or (M > 1 and x.stride(0) < Kx):
        x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.bfloat16)
    if M == 0:
        return y
    code = _int4_matmul_fn()(
        x.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(), y.data_ptr(),
        M, N, K, Kx, x.stride(0) if M > 1 else Kx, group, torch.get_num_threads(),
    )  # fmt: skip
    if code:
        raise RuntimeError(
            f"qkv_int4_matmul_bf16 failed ({code}) for x {tuple(x.shape)}, weight [{N}, {K}], group {group}"
        )
    return y


# Defined through `torch.library.Library` rather than `custom_op`: a compiled graph's call of the
# operator then skips custom_op's Python wrappers: most of its cost over torch's own kernel in an ad-hoc
# measurement (chained small products under inductor's C++ wrapper); a decode step makes 121 calls.
_LIB = torch.library.Library("qkv", "FRAGMENT")
_LIB.define("int4_matmul(Tensor x, Tensor packed, int group, Tensor scales_and_zeros) -> Tensor")
_LIB.impl("int4_matmul", int4_matmul_eager, "CPU")


@torch.library.register_fake("qkv::int4_matmul")
def _(x, packed, group, scales_and_zeros):
    return x.new_empty(x.shape[0], packed.shape[0])


int4_matmul = torch.ops.qkv.int4_matmul
"""`int4_matmul_eager` as a torch operator, for compiled graphs (inductor's C++ wrapper included)."""
