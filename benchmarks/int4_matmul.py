"""Packed int4 products by row count: torch's kernel vs qkv's (`qkv/kernels/int4_matmul.c`).

    python benchmarks/int4_matmul.py [--cold] [ROWS ...]   (default rows: 1 4 16)

For SmolLM2-135M's layer shapes (in -> out; the fused q/k/v and gate/up layers qkv loads, the
unfused ones, and the 576 -> 49152 head as group-wise int8, which runs as two int4 halves over
[x | x]) with random weights, this prints the best-of-30 time of one `QuantLinear` forward
- through torch's `_weight_int4pack_mm_for_cpu` ("torch"),
- through qkv's kernel called directly, as eager forwards do ("qkv"),
- through the `qkv::int4_matmul` operator called by itself, as compiled graphs call it ("qkv op":
  the operator's dispatch, without the layer's own Python),
- and of a dense bfloat16 matmul of the same weight ("dense", what 32 rows or more use),
with the ratios torch / qkv (the like-for-like one) and torch / qkv op; above 1, qkv's kernel is faster.
`INT4_MATMUL_ROWS` in `qkv/nn/quant.py` is read off this table. Both kernels run on torch's threads.

--cold: the packed weights come from memory, as in a model (whose layers do not fit the caches):
each timed call runs the product over distinct copies of the layer (64 MB of them, at least two),
and the time is per product. The dense column stays one weight, in cache.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

from qkv import kernels
from qkv.bench import best_time
from qkv.kernels import ops
from qkv.nn import quant
from qkv.nn.quant import QuantLinear, quantize_weight

SHAPES = {  # name: (in_features, out_features, bits, group)
    "576->960 (qkv)": (576, 960, 4, 32),
    "576->576": (576, 576, 4, 32),
    "576->192": (576, 192, 4, 32),
    "576->1536": (576, 1536, 4, 32),
    "576->3072 (gate+up)": (576, 3072, 4, 32),
    "1536->576": (1536, 576, 4, 32),
    "head 576->49152 (Q8_0)": (576, 49152, 8, 32),
}


def layer(k: int, n: int, bits: int, group: int) -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    out = QuantLinear(k, n, bits=bits, group_size=group)
    out.assign(quantize_weight(torch.randn(n, k, generator=g) * 0.05, bits, group))
    out.prepare(torch.bfloat16)
    return out


COLD_BYTES = 64 << 20  # --cold: copies of a layer up to this many packed bytes (beyond a last-level cache)


def forward_ms(layers: list[QuantLinear], x: torch.Tensor, native: bool) -> tuple[float, torch.Tensor]:
    """Best-of-30 ms of one `layer(x)` (averaged over `layers`) on qkv's kernel (native) or torch's
    (for every layer, group-wise int8 included), and the first layer's output."""
    saved = quant.INT4_MATMUL_ROWS, quant._native_int4_matmul
    try:
        quant.INT4_MATMUL_ROWS = 1
        if not native:
            quant._native_int4_matmul = lambda: False
        return best_time(lambda: [lin(x) for lin in layers], 30) * 1e3 / len(layers), layers[0](x)
    finally:
        quant.INT4_MATMUL_ROWS, quant._native_int4_matmul = saved


def main() -> None:
    if not ops.int4_matmul_available():
        why = kernels.unavailable("int4_matmul") or "this CPU has no AVX-512 BF16"
        raise SystemExit(f"qkv's int4 kernel is not available here: {why}")
    cold = "--cold" in sys.argv[1:]
    rows_list = [int(r) for r in sys.argv[1:] if r != "--cold"] or [1, 4, 16]
    weights = f"over copies of each layer ({COLD_BYTES >> 20} MB or two, not in cache)" if cold else "in cache"
    print(f"threads {torch.get_num_threads()}; ms a product (best of 30), {weights}")
    header = ("torch", "qkv", "qkv op", "dense", "torch/qkv", "torch/op")
    print(f"{'shape':<24} {'rows':>4} " + " ".join(f"{h:>9}" for h in header))
    with torch.no_grad():
        for name, (k, n, bits, group) in SHAPES.items():
            lin = layer(k, n, bits, group)
            copies = max(2, COLD_BYTES // (n * k // 2 + n * k // group * 4)) if cold else 1
            layers = [lin] + [copy.deepcopy(lin) for _ in range(copies - 1)]
            forms = [m._kernel for m in layers]
            dense = lin.dequantize(torch.bfloat16)
            for rows in rows_list:
                x = torch.randn(rows, k).bfloat16()
                t_torch, want = forward_ms(layers, x, native=False)
                t_qkv, got = forward_ms(layers, x, native=True)
                if (got.float() - want.float()).abs().max() > 2**-6 * want.float().abs().max():
                    raise SystemExit(f"{name} rows {rows}: qkv's kernel disagrees with torch's")
                t_op = (
                    best_time(lambda x=x, forms=forms: [ops.int4_matmul(x, f[1], f[2], f[3]) for f in forms], 30)
                    * 1e3
                    / len(forms)
                )
                t_dense = best_time(lambda x=x, w=dense: F.linear(x, w), 30) * 1e3
                print(
                    f"{name:<24} {rows:>4} {t_torch:>9.3f} {t_qkv:>9.3f} {t_op:>9.3f} {t_dense:>9.3f} "
                    f"{t_torch / t_qkv:>8.2f}x {t_torch / t_op:>8.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
