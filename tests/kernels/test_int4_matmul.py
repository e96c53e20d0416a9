"""`qkv::int4_matmul` (qkv/kernels/int4_matmul.c): few-row products with torch's packed int4 layout
against a float64 reference, through `QuantLinear`, compiled, and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from qkv import kernels
from qkv.kernels import ops
from qkv.nn import quant
from qkv.nn.quant import QuantLinear, quantize_weight

pytestmark = pytest.mark.skipif(not ops.int4_matmul_available(), reason="no C compiler or no AVX-512 BF16 here")


def packed_layer(n: int, k: int, group: int, bits: int = 4, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(k, n, bits=bits, group_size=group)
    layer.assign(quantize_weight(torch.randn(n, k, generator=g) * 0.1, bits, group))
    layer.prepare(torch.bfloat16)
    assert layer._kernel[0] == "int4"
    return layer


def reference(layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ w^T, |x| @ |w|^T) in float64, w from the kernel's own operands: the integers and the
    bfloat16 scales and zeros (w = (q - 8) * scale + zero per group of columns)."""
    _, packed, group, sz, doubled = layer._kernel
    N, K = packed.shape[0], packed.shape[1] * 2
    if layer._released:
        q = quant._int4unpack(packed)  # for a doubled weight: its two int4 halves [hi + 8 | lo]
    else:  # torch's converter packed it (rows not a multiple of 64): the stored form, int4 only
        assert not doubled
        q = layer.values()
    if doubled:  # group-wise int8 as two int4 halves, over [x | x]
        x = torch.cat((x.view(x.shape[0], -1, group),) * 2, dim=1).view(x.shape[0], K)
    s, z = sz.double().unbind(-1)  # [K / group, N]
    w = (q.view(N, K // group, group).double() - 8) * s.T[..., None] + z.T[..., None]
    w = w.view(N, K)
    return x.double() @ w.T, x.double().abs() @ w.abs().T


SHAPES = {  # name: (N, K, group)
    "smollm2-qkv": (960, 576, 32),
    "n-not-a-multiple-of-64": (208, 96, 32),  # a last block of 16 rows in torch's pair layout
    "n-48-tail": (112, 64, 32),
    "groups-of-64": (128, 256, 64),
    "groups-of-128": (64, 384, 128),
    "one-group": (64, 32, 32),
}


@pytest.mark.parametrize("rows", [1, 3, 16, 31])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, rows):
    n, k, group = SHAPES[shape]
    layer = packed_layer(n, k, group)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
    _, packed, group, sz, _ = layer._kernel
    got = ops.int4_matmul(x, packed, group, sz)
    want, magnitude = reference(layer, x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # one bfloat16 rounding of the output (2^-8 relative) over float32 sums of exact products
    assert ((got.double() - want).abs() <= want.abs() * 2**-8 + magnitude * 2**-18).all()
    # and torch's own kernel agrees to its output rounding
    theirs = torch._weight_int4pack_mm_for_cpu(x, packed, group, sz).double()
    assert ((got.double() - theirs).abs() <= theirs.abs() * 2**-7 + magnitude * 2**-16).all()


@pytest.mark.parametrize("rows", [1, 16])
def test_group_wise_int8_reads_x_twice_by_itself(rows):
    """A Q8_0 weight runs as two int4 halves over [x | x]: the kernel takes x once (K = 2 Kx)."""
    layer = packed_layer(320, 128, 32, bits=8)
    assert layer._kernel[4]  # doubled
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    _, packed, group, sz, _ = layer._kernel
    got = ops.int4_matmul(x, packed, group, sz)
    want, magnitude = reference(layer, x)
    assert ((got.double() - want).abs() <= want.abs() * 2**-8 + magnitude * 2**-18).all()
    dense = x.double() @ layer.dequantize(torch.float64).T  # the layer's own values, float32 scales
    assert (got.double() - dense).abs().max() <= 2**-6 * dense.abs().max()


def test_strided_activations_are_read_in_place():
    layer = packed_layer(128, 64, 32)
    wide = torch.randn(5, 100).bfloat16()
    x = wide[:, 10:74]  # row stride 100
    _, packed, group, sz, _ = layer._kernel
    assert torch.equal(ops.int4_matmul(x, packed, group, sz), ops.int4_matmul(x.contiguous(), packed, group, sz))


def test_no_rows_give_an_empty_product():
    layer = packed_layer(320, 128, 32, bits=8)  # group-wise int8 takes the kernel at any row count
    assert layer(torch.empty(0, 128).bfloat16()).shape == (0, 320)


def test_bad_operands_say_what_is_wrong():
    layer = packed_layer(64, 64, 32)
    _, packed, group, sz, _ = layer._kernel
    with pytest.raises(ValueError, match="cast the activations to bfloat16"):
        ops.int4_matmul_eager(torch.randn(2, 64), packed, group, sz)
    with pytest.raises(ValueError, match=r"scales_and_zeros must be a contiguous \[2, 64, 2\]"):
        ops.int4_matmul_eager(torch.randn(2, 64).bfloat16(), packed, group, sz[:1])
    with pytest.raises(RuntimeError, match="failed"):  # a group that does not divide x's columns
        ops.int4_matmul_eager(torch.randn(2, 48).bfloat16(), packed, group, sz)


def test_quant_linear_takes_the_kernel_from_int4_matmul_rows_on(monkeypatch):
    layer = packed_layer(192, 128, 32)
    calls = []
    native = ops.int4_matmul_eager
    monkeypatch.setattr(ops, "int4_matmul_eager", lambda *a: calls.append(a[0].shape[0]) or native(*a))
    monkeypatch.setattr(quant, "INT4_MATMUL_ROWS", 4)
    x = torch.randn(2, 3, 128).bfloat16()  # 6 rows: the kernel
    y = layer(x)
    assert calls == [6] and y.shape == (2, 3, 192)
    small = layer(x[0, :3])  # 3 rows: torch's kernel
    assert calls == [6]
    assert (y[0].float() - small.float()).abs().max() <= 2**-7 * small.float().abs().max()


def test_qkv_native_0_keeps_torchs_kernel(monkeypatch):
    layer = packed_layer(128, 64, 32)
    x = torch.randn(8, 64).bfloat16()
    calls = []
    monkeypatch.setattr(ops, "int4_matmul_eager", lambda *a: calls.append(1))
    monkeypatch.setattr(quant, "INT4_MATMUL_ROWS", 1)
    monkeypatch.setenv("QKV_NATIVE", "0")
    kernels.library.cache_clear()
    try:
        y = layer(x)
        assert kernels.unavailable("int4_matmul") == "QKV_NATIVE=0"
    finally:
        kernels.library.cache_clear()
    assert calls == [] and y.shape == (8, 128)


def test_a_compiled_graph_calls_the_kernel(monkeypatch):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(quant, "INT4_MATMUL_ROWS", 4)
    layer = packed_layer(192, 128, 32, seed=1)
    x = torch.randn(16, 128).bfloat16()
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(layer, fullgraph=True), x)
        assert "int4_matmul" in "\n".join(code)
        assert torch.equal(got, layer(x))
