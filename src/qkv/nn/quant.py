"""Weight-only quantized linear layers: int4 (group-wise, asymmetric) and int8 (symmetric,
per output channel or group-wise), a drop-in for `Linear` in every family.

Stored form (what a checkpoint holds, the same on every machine):
- int4: `qweight` uint8 [N, K/2], two 4-bit values q in [0, 15] per byte (column 2j in the low
  nibble, 2j+1 in the high one); `scales` and `zeros` float32 [N, K/group]. A weight is
  w = (q - 8) * scale + zero, torch's own int4 convention, so llama.cpp's Q4_0
  (w = (q - 8) * d) maps to zero = 0 and Q4_1 (w = q * d + m) to zero = m + 8d, bit for bit.
- int8: `qweight` int8 [N, K]; `scales` float32 [N, K/group] (one group: per channel). w = q * scale.
  llama.cpp's Q8_0 is group-wise int8 with groups of 32.

Compute: at the first bfloat16 inference forward (or `prepare()`) the weight is converted once into
the layout of torch's packed CPU kernels, which then is the only copy of the values in memory
(the stored form is rebuilt from it for `state_dict()` and `dequantize()`). Those kernels
(`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) read 4 or 8 bits a weight instead of 16
or 32: a matrix-vector product, batch-1 decoding's whole cost, is bound by how many bytes it
reads. Group-wise int8 runs through the int4 kernel too: q = 16 hi + lo with hi in [-8, 7] and lo
in [0, 15] is exact, and [x | x] @ [hi | lo]^T is one int4 product over 2K columns. From
`INT4_MATMUL_ROWS` rows (and for group-wise int8 at any row count) int4 products take qkv's own
kernel on the same packed form (`qkv::int4_matmul`, qkv/kernels/int4_matmul.c), which decodes the
weight once for up to 6 rows where torch's decodes it again every 4 rows. Many rows at
once (a long prompt) are compute-bound, not byte-bound: they dequantize the weight to the
activations' dtype and take the dense oneDNN matmul. Without the kernels (an older torch,
another device, float32 activations, training), every product is dequantize + matmul.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qkv import kernels
from qkv.nn.linear import Linear

__all__ = [
    "QUANT_SCHEMES",
    "QuantLinear",
    "dequantize_model",
    "pack_nibbles",
    "prepare_model",
    "quantize_model",
    "quantize_weight",
    "quantized_modules",
    "unpack_nibbles",
]

# Name -> (bits, group size; None = one group per output channel).
QUANT_SCHEMES: dict[str, tuple[int, int | None]] = {"int4": (4, 32), "int8": (8, None)}
# The output head, whatever the scheme: group-wise int8, llama.cpp's Q8_0 grid. Its errors land
# straight on the logits: on SmolLM2 an int4 head costs +5.8% perplexity and a per-channel int8
# one +0.24%; int8 in groups of 32 costs nothing measurable (tests/nn/test_quant_quality.py).
HEAD_SCHEME: tuple[int, int | None] = (8, 32)
HEAD_NAMES = ("lm_head",)

# Rows from which a forward dequantizes the layer for the dense matmul instead of using the packed
# kernels. A rough choice, not a tuned one: the int4 kernel works a row at a time (at 16 rows it is
# 2x slower than a packed bf16 matmul), while dequantizing costs a pass over the whole layer per call.
DENSE_ROWS = int(os.environ.get("QKV_QUANT_DENSE_ROWS", "32"))
# Rows from which a layer with a dense twin (`QuantLinear.share_dense`: a tied head's embedding
# table) multiplies by the twin: from about 16 rows the dense matmul's arithmetic beats the packed
# kernel's (qkv's, for the group-wise int8 head), below it the packed form's fewer bytes win
# (benchmarks/head_rows.py prints both by row count).
TWIN_ROWS = int(os.environ.get("QKV_QUANT_TWIN_ROWS", "16"))
# Rows from which an int4 product (group-wise int8 included) runs on qkv's own kernel
# (`qkv/kernels/int4_matmul.c`: the weight decoded once for up to 6 rows, bfloat16 dot products)
# instead of torch's, which decodes it again for every 4 rows and does float32 FMAs. With fewer
# rows both read the same bytes, and the operator's Python dispatch in a compiled graph eats the
# small gain; benchmarks/int4_matmul.py prints both kernels by row count and shape. Group-wise int8
# (a two-halves int4 weight: the head) takes qkv's kernel at every row count: it reads x twice by
# itself, where torch's kernel needs [x | x] built first.
INT4_MATMUL_ROWS = int(os.environ.get("QKV_INT4_MATMUL_ROWS", "4"))
_INT4_KERNEL = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")
_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values [..., 2n] in [0, 15] -> bytes [..., n]: column 2j low nibble, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: bytes [..., n] -> uint8 [..., 2n]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


_BLOCK_N = 64  # rows per block of torch's CPU int4 layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp)


def _int4pack(q: torch.Tensor) -> torch.Tensor:
    """Values [N, K] in [0, 15] -> torch's packed CPU int4 layout.

    Where `int4_layout_known` has confirmed the layout `_int4unpack` reads, it is written directly
    (three byte-wide passes); otherwise torch's converter runs a block of rows at a time (it wants
    int32: a whole large matrix would need 4 bytes a weight at once).
    """
    N, K = q.shape
    if int4_layout_known(N):
        out = torch.empty(N // _BLOCK_N, K, _BLOCK_N // 2, dtype=torch.uint8)
        half, step = _BLOCK_N // 2, 64  # blocks at a time: bounded temporaries for a large head
        for i in range(0, N // _BLOCK_N, step):
            blocks = q[i * _BLOCK_N : (i + step) * _BLOCK_N].to(torch.uint8).view(-1, _BLOCK_N, K)
            out[i : i + step] = (blocks[:, :half] | (blocks[:, half:] << 4)).transpose(1, 2)
        return out.view(N, K // 2)
    return _int4pack_torch(q)


def _int4pack_torch(q: torch.Tensor) -> torch.Tensor:
    N = q.shape[0]
    step = 4096 if N % _BLOCK_N == 0 else N
    return torch.cat([torch._convert_weight_to_int4pack_for_cpu(q[i : i + step].to(torch.int32), 1)
                      for i in range(0, N, step)])  # fmt: skip


def _int4unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `_int4pack` (uint8 [N, K]) for the layout `int4_layout_known` checked: each
    block of 64 rows is [K, 32] bytes holding row n in the low nibble and row n + 32 in the high."""
    N, K = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(N // _BLOCK_N, K, _BLOCK_N // 2)
    return torch.cat((blocks & 15, blocks >> 4), dim=2).transpose(1, 2).reshape(N, K)


@functools.cache
def _int4_layout_ok() -> bool:
    """Whether this torch's packed layout is the one `_int4unpack` reads (checked once, on random values)."""
    q = torch.randint(0, 16, (2 * _BLOCK_N, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        return torch.equal(_int4unpack(_int4pack_torch(q)), q)
    except RuntimeError:
        return False


def int4_layout_known(rows: int) -> bool:
    """Whether a weight of `rows` output rows can be written in torch's packed int4 layout directly:
    whole 64-row blocks, and a torch whose layout is the one `_int4unpack` reads."""
    return rows % _BLOCK_N == 0 and _int4_layout_ok()


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None) -> dict[str, torch.Tensor]:
    """Round a dense weight [N, K] to the stored form of `QuantLinear` (round to nearest).

    int4: asymmetric per group (its min and max are representable), zero = min + 8 * scale.
    int8: symmetric, scale = max|w| / 127 per group (per channel when group_size is None).
    """
    w = weight.detach().float()
    N, K = w.shape
    group = group_size or K
    if K % group:
        raise ValueError(f"in_features={K} is not a multiple of the group size {group}")
    g = w.view(N, K // group, group)
    if bits == 4:
        low, high = g.amin(-1), g.amax(-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = ((g - low[..., None]) / scale[..., None]).round().clamp(0, 15).view(N, K)
        return {"qweight": pack_nibbles(q), "scales": scale, "zeros": low + 8 * scale}
    if bits == 8:
        scale = (g.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = (g / scale[..., None]).round().clamp(-127, 127).view(N, K).to(torch.int8)
        return {"qweight": q, "scales": scale}
    raise ValueError(f"bits={bits} is not supported; choose 4 or 8")


_INT4_DENSE_ARGS = (ctypes.c_void_p,) * 3 + (ctypes.c_int64,) * 3 + (ctypes.c_int,)


def _int4_dense_native(packed: torch.Tensor, scales_and_zeros: torch.Tensor, out: torch.Tensor, n: int, k: int,
                       group: int) -> bool:  # fmt: skip
    """Fill `out` (bfloat16 [k, n]: W^T) from the packed int4 form with the C kernel in
    `qkv/kernels/int4_dense.c`: one pass, ~10x the torch ops below it. False where it is not built."""
    fn = kernels.function("int4_dense", "qkv_int4_dense_bf16", _INT4_DENSE_ARGS)
    if fn is None or not (packed.is_contiguous() and scales_and_zeros.is_contiguous() and out.is_contiguous()):
        return False
    return fn(packed.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(), n, k, group, torch.get_num_threads()) == 0


@kernels.constant_result
def _native_int4_matmul() -> bool:
    """Whether `qkv::int4_matmul` runs here (built, AVX-512 BF16); False with QKV_NATIVE=0."""
    if kernels.library("int4_matmul") is None:
        return False
    from qkv.kernels import ops

    return ops.int4_matmul_available()


class QuantLinear(nn.Module):
    """y = x @ dequantize(qweight)^T + bias, reading the weight packed. Same forward contract as
    `Linear` (x [..., in_features] -> [..., out_features]); weights are buffers: frozen."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        bits: int = 4,
        group_size: int | None = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits} is not supported; choose 4 or 8")
        if bits == 4 and group_size is None:
            raise ValueError("int4 weights are quantized in groups; give a group_size (e.g. 32)")
        group = group_size or in_features
        if in_features % group or (bits == 4 and (in_features % 2 or group % 2)):
            raise ValueError(f"in_features={in_features} is not a multiple of the group size {group}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group
        qshape = (out_features, in_features // 2) if bits == 4 else (out_features, in_features)
        qdtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        if bits == 4:
            self.register_buffer("zeros", torch.zeros(out_features, groups, device=device))
        else:
            self.zeros = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        # Once the packed kernel form is built, it is the only copy of the values in memory: the
        # stored `qweight` becomes an empty placeholder and is rebuilt from it when asked for.
        self._kernel: tuple | None = None
        self._kernel_dtype: torch.dtype | None = None
        self._released = False
        self._twin: tuple[torch.Tensor, ...] = ()  # see share_dense; a tuple keeps it out of the state dict

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 32) -> QuantLinear:
        """Quantize a dense linear layer (round to nearest; see `quantize_weight`)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, device="meta")
        return out.assign(quantize_weight(linear.weight, bits, group_size), bias=linear.bias)

    def assign(self, stored: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> QuantLinear:
        """Take the stored form (`qweight`, `scales`, `zeros`) as this layer's tensors, checked."""
        for name, tensor in stored.items():
            current = self._stored_placeholder() if name == "qweight" else getattr(self, name)
            if current is None or tuple(tensor.shape) != tuple(current.shape):
                expected = None if current is None else tuple(current.shape)
                raise ValueError(f"{name}: got shape {tuple(tensor.shape)}, this layer holds {expected}")
            setattr(self, name, tensor.to(current.dtype) if name != "qweight" else tensor)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._forget_kernel()
        return self

    def _forget_kernel(self) -> None:
        self._kernel, self._kernel_dtype, self._released = None, None, False
        self._twin = ()

    def share_dense(self, weight: torch.Tensor) -> None:
        """Multiply forwards of `TWIN_ROWS` rows or more by `weight` [out, in], a dense tensor the
        model holds anyway that stands for the same values: a tied head's embedding table, which
        is the head dequantized (a GGUF's Q8_0 table) or the dense original it was quantized from
        (`quantize_model`). It is shared, not copied, and dropped when the layer moves."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"a dense twin must be [{self.out_features}, {self.in_features}], got {tuple(weight.shape)}"
            )
        self._twin = (weight,)

    def adopt_kernel(self, form: dict[str, torch.Tensor]) -> QuantLinear:
        """Take a ready bfloat16 kernel form as this layer's values: {"packed" [N, kk / 2] uint8 in
        torch's int4 layout, "scales_and_zeros" [kk / group, N, 2] bfloat16, "scales" (and int4
        "zeros") [N, K / group] float32}, kk = 2K for group-wise int8 (two int4 halves), as
        `prepare(torch.bfloat16)` would build it. A loader that writes it straight from a file
        (`qkv.checkpoints.gguf.kernel_form`) skips the stored copy and the repacking; the stored
        `qweight` is released, as `prepare` releases it, and rebuilt from the kernel form on demand."""
        N, K, group = self.out_features, self.in_features, self.group_size
        if group is None or not int4_layout_known(N):
            raise ValueError(f"a {N}-row layer of group size {group} has no packed int4 kernel form")
        doubled = self.bits == 8
        kk = 2 * K if doubled else K
        shapes = {"packed": ((N, kk // 2), torch.uint8), "scales_and_zeros": ((kk // group, N, 2), torch.bfloat16),
                  "scales": ((N, K // group), torch.float32)}  # fmt: skip
        if not doubled:
            shapes["zeros"] = ((N, K // group), torch.float32)
        for key, (shape, dtype) in shapes.items():
            got = form.get(key)
            if got is None or tuple(got.shape) != shape or got.dtype != dtype:
                found = None if got is None else (tuple(got.shape), got.dtype)
                raise ValueError(f"kernel form {key!r}: expected {dtype} of shape {shape}, got {found}")
        self.scales = form["scales"]
        if not doubled:
            self.zeros = form["zeros"]
        self._forget_kernel()
        self._kernel = ("int4", form["packed"], group, form["scales_and_zeros"], doubled)
        self._kernel_dtype, self._released = torch.bfloat16, True
        self.qweight = self._stored_placeholder()
        return self

    def extra_repr(self) -> str:
        grouping = f"group_size={self.group_size}" if self.group_size else "per-channel"
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, {grouping}, " \
               f"bias={self.bias is not None}"  # fmt: skip

    def values(self) -> torch.Tensor:
        """The integer values q [N, K]: uint8 in [0, 15] (int4) or int8."""
        if self._released:
            return self._values_from_kernel()
        return unpack_nibbles(self.qweight) if self.bits == 4 else self.qweight

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`dequantize()[ids]` (float32 arithmetic) rounded to `dtype`, reading only those rows:
        ids [n] -> [n, K]. A tied head's embedding lookup (`qkv.nn.packed_embedding`)."""
        N, K = self.out_features, self.in_features
        if not torch.compiler.is_compiling() and ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < N):
            raise IndexError(f"row ids must be in [0, {N}), got {int(ids.min())}..{int(ids.max())}")
        group = self.group_size or K
        q = self._values_of_rows(ids).view(-1, K // group, group).float()
        if self.bits == 4:
            w = (q - 8) * self.scales[ids][..., None] + self.zeros[ids][..., None]
        else:
            w = q * self.scales[ids][..., None]
        return w.view(-1, K).to(dtype)

    def _values_of_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """`values()[ids]`, unpacking only those rows."""
        if not self._released:
            return unpack_nibbles(self.qweight[ids]) if self.bits == 4 else self.qweight[ids]
        _, packed, group, _, doubled = self._kernel
        blocks = packed.view(self.out_features // _BLOCK_N, -1, _BLOCK_N // 2)  # see _int4unpack
        j = ids % _BLOCK_N
        byte = blocks[ids // _BLOCK_N, :, j % (_BLOCK_N // 2)]  # [n, kk]
        q = torch.where((j < _BLOCK_N // 2)[:, None], byte & 15, byte >> 4)
        if not doubled:
            return q
        halves = q.view(-1, 2, self.in_features // group, group).to(torch.int16)
        return ((halves[:, 0] - 8) * 16 + halves[:, 1]).view(-1, self.in_features).to(torch.int8)

    def _stored_placeholder(self) -> torch.Tensor:
        """A meta tensor with the stored `qweight`'s shape and dtype (what the checkpoint holds)."""
        N, K = self.out_features, self.in_features
        shape, dtype = ((N, K // 2), torch.uint8) if self.bits == 4 else ((N, K), torch.int8)
        return torch.empty(shape, dtype=dtype, device="meta")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._released:  # the checkpoint holds the stored form, whatever is in memory
            q = self.values()
            destination[prefix + "qweight"] = pack_nibbles(q) if self.bits == 4 else q

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._released:  # give the loader a tensor of the stored shape to check against and fill
            placeholder = self._stored_placeholder()
            self.qweight = torch.empty(placeholder.shape, dtype=placeholder.dtype, device=self.scales.device)
            self._forget_kernel()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._forget_kernel()

    def _apply(self, fn, recurse=True):
        """`model.to(dtype)` moves but never rounds the scales and zeros: they stay float32."""
        kept = {k: self._buffers[k] for k in ("scales", "zeros") if self._buffers.get(k) is not None}
        self._twin = ()
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [N, K] these values stand for."""
        N, K = self.out_features, self.in_features
        group = self.group_size or K
        q = self.values().view(N, K // group, group).to(dtype)
        if self.bits == 4:
            w = (q - 8) * self.scales[..., None].to(dtype) + self.zeros[..., None].to(dtype)
        else:
            w = q * self.scales[..., None].to(dtype)
        return w.view(N, K)

    # -- compute ------------------------------------------------------------------------------

    def prepare(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """Build the packed kernel form for `dtype` activations now (the first forward would)."""
        if self._kernel_dtype != dtype:
            try:
                self._kernel = self._build_kernel(dtype)
            except RuntimeError:  # a shape the kernel does not take (its rows must be a multiple of 16)
                self._kernel = ("dense",)
            self._kernel_dtype = dtype
            if self._kernel[0] == "int4" and int4_layout_known(self._kernel[1].shape[0]):
                self._released = True
                self.qweight = self._stored_placeholder()

    def _build_kernel(self, dtype: torch.dtype) -> tuple:
        N, K = self.out_features, self.in_features
        q = self.values()
        if self.bits == 8 and self.group_size is None:
            return ("int8", q, self.scales[:, 0].to(dtype))
        if self.bits == 4:
            scales, zeros, group = self.scales, self.zeros, self.group_size
        else:  # group-wise int8 as two int4 halves: w = s * (16 hi + lo) = (hi+8 - 8) 16s + (lo - 8) s + 8s
            v = q.view(N, K // self.group_size, self.group_size)
            q = torch.cat(((v >> 4) + 8, v & 15), dim=1).view(N, 2 * K)  # arithmetic shift: hi in [-8, 7]
            s, group = self.scales, self.group_size
            scales, zeros = torch.cat((16 * s, s), 1), torch.cat((torch.zeros_like(s), 8 * s), 1)
        scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(dtype)
        return ("int4", _int4pack(q), group, scales_and_zeros, self.bits == 8)

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight for a many-row forward, equal to `dequantize(dtype)`: an [N, K] view of
        W^T [K, N], the layout the matmul reads. From the int4 kernel layout it is written block of
        64 rows by block (the packed order: contiguous reads and writes), scaled in place, straight
        into that tensor: no copy to reach the layout."""
        kernel = self._kernel
        if not (self._released and dtype == self._kernel_dtype and kernel[0] == "int4" and not kernel[4]):
            return self.dequantize(dtype)
        _, packed, group, scales_and_zeros, _ = kernel
        N, K = self.out_features, self.in_features
        nb, half = N // _BLOCK_N, _BLOCK_N // 2
        w_t = torch.empty(K, N, dtype=dtype)
        if dtype == torch.bfloat16 and _int4_dense_native(packed, scales_and_zeros, w_t, N, K, group):
            return w_t.t()
        wt = w_t.view(K, nb, _BLOCK_N).transpose(0, 1)  # wt[b, k, j] = W[b * 64 + j, k]
        blocks = packed.view(nb, K, half)
        wt[..., :half] = blocks & 15
        wt[..., half:] = blocks >> 4
        scale, zero = scales_and_zeros.unbind(-1)  # [K / group, N] each, in `dtype`
        scale, zero = scale.view(-1, nb, _BLOCK_N).transpose(0, 1), zero.view(-1, nb, _BLOCK_N).transpose(0, 1)
        g = wt.view(nb, K // group, group, _BLOCK_N)
        g.sub_(8).mul_(scale[:, :, None]).add_(zero[:, :, None])  # `dequantize`'s arithmetic, bit for bit
        return w_t.t()

    def _values_from_kernel(self) -> torch.Tensor:
        _, packed, group, _, doubled = self._kernel
        N, K = self.out_features, self.in_features
        q = _int4unpack(packed)
        if not doubled:
            return q
        halves = q.view(N, 2, K // group, group).to(torch.int16)
        return ((halves[:, 0] - 8) * 16 + halves[:, 1]).view(N, K).to(torch.int8)

    def _can_use_kernel(self, x: torch.Tensor) -> bool:
        # The kernels are fast for bfloat16 activations only (float32: ~30x slower than dequantizing).
        if x.device.type != "cpu" or x.dtype != torch.bfloat16:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        return _INT8_KERNEL if (self.bits == 8 and self.group_size is None) else _INT4_KERNEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.numel() // max(x.shape[-1], 1)
        if self._twin and rows >= TWIN_ROWS and self._twin[0].dtype == x.dtype:
            return F.linear(x, self._twin[0], self.bias.to(x.dtype) if self.bias is not None else None)
        if torch.compiler.is_compiling():
            # A compiled graph reads the kernel form as a constant: `prepare` builds it beforehand.
            kernel = self._kernel if self._kernel_dtype == x.dtype else None
        elif rows < DENSE_ROWS and self._can_use_kernel(x):
            self.prepare(x.dtype)
            kernel = self._kernel
        else:
            kernel = None
        if kernel is None or kernel[0] == "dense":
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return F.linear(x, self._dense_weight(x.dtype), bias)
        x2 = x.reshape(rows, self.in_features)
        if kernel[0] == "int8":
            y = torch._weight_int8pack_mm(x2, kernel[1], kernel[2])
        elif (rows >= INT4_MATMUL_ROWS or kernel[4]) and x.dtype == torch.bfloat16 and _native_int4_matmul():
            from qkv.kernels import ops  # lazily: registering its operators imports dynamo

            _, packed, group, scales_and_zeros, _ = kernel  # a doubled weight: the kernel reads x twice itself
            matmul = ops.int4_matmul if torch.compiler.is_compiling() else ops.int4_matmul_eager
            y = matmul(x2, packed, group, scales_and_zeros)
        else:
            _, packed, group, scales_and_zeros, doubled = kernel
            if doubled:
                x2 = torch.cat((x2.view(rows, -1, group), x2.view(rows, -1, group)), dim=1).view(rows, -1)
            y = torch._weight_int4pack_mm_for_cpu(x2, packed, group, scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)


def quantized_modules(model: nn.Module) -> dict[str, dict]:
    """{module name: {"bits", "group_size"}} for every `QuantLinear` in `model` (what a checkpoint records)."""
    layers = ((name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear))
    return {name: {"bits": m.bits, "group_size": m.group_size} for name, m in layers}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def default_targets(model: nn.Module) -> list[str]:
    """The linear layers worth quantizing: every `Linear` with a weight of its own (a head tied to
    the embeddings is quantized as its own copy: the embedding lookup stays dense)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not m.weight.is_meta]


def quantize_model(
    model: nn.Module,
    scheme: str = "int4",
    targets: Iterable[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Replace linear layers of `model` in place by `QuantLinear`s of `scheme` ("int4": group-wise
    int4 with groups of 32; "int8": per-channel int8) and return it. The output head (`HEAD_NAMES`)
    is group-wise int8 under either scheme (`HEAD_SCHEME`).

    targets: module names (default: every linear layer, see `default_targets`). A layer whose
    input size the group does not divide stays dense.
    """
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(QUANT_SCHEMES)}")
    names = list(default_targets(model) if targets is None else targets)
    for i, name in enumerate(names):
        linear = model.get_submodule(name)
        bits, group = HEAD_SCHEME if name.rpartition(".")[2] in HEAD_NAMES else QUANT_SCHEMES[scheme]
        if group and linear.in_features % group:
            continue
        with torch.no_grad():
            quant = QuantLinear.from_linear(linear, bits, group)
        _set_module(model, name, quant)
        if progress:
            progress(i + 1, len(names))
    return model


def empty_quantized(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Swap the named layers for empty `QuantLinear`s of the recorded layout (a checkpoint being
    loaded; usually on the meta device) and return the model."""
    for name, spec in layout.items():
        linear = model.get_submodule(name)
        device = linear.weight.device
        _set_module(
            model,
            name,
            QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, spec["bits"],
                        spec["group_size"], device=device, dtype=linear.weight.dtype),
        )  # fmt: skip
    return model


def prepare_model(model: nn.Module) -> nn.Module:
    """Build every `QuantLinear`'s packed kernel form now, in the model's activation dtype (the
    first forward would): loading pays for it once, and the stored copies are released. A tied
    head gets the embedding table as its dense twin (`QuantLinear.share_dense`)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if layers and dtype == torch.bfloat16 and _INT4_KERNEL:
        for layer in layers:
            layer.prepare(dtype)
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "embed", None), "tokens", None)
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tied and isinstance(head, QuantLinear) and isinstance(embed, nn.Embedding) and not embed.weight.is_meta:
        head.share_dense(embed.weight)  # the tied head's dense twin: its own dequantized table
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `QuantLinear` by a dense `Linear` holding its dequantized weight (in place)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            dense = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            target = dtype or (m.bias.dtype if m.bias is not None else torch.float32)
            dense.weight = nn.Parameter(m.dequantize(target))
            if m.bias is not None:
                dense.bias = nn.Parameter(m.bias.detach().to(target))
            _set_module(model, name, dense)
    from qkv.nn.packed_embedding import TiedPackedEmbedding  # here: it imports this module

    for name, m in list(model.named_modules()):
        if isinstance(m, TiedPackedEmbedding):  # its head is dense now: the table is a plain one again
            _set_module(model, name, nn.Embedding.from_pretrained(m.weight, freeze=False))
    return model
