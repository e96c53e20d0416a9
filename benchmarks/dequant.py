"""Dequantizing a packed model's layers for a prompt: torch ops vs the C kernel (`qkv/kernels/int4_dense.c`).

    python benchmarks/dequant.py [MODEL]   (default: smollm2-135m-instruct, packed Q4_1 GGUF)

A forward of `DENSE_ROWS` rows or more (a prompt) turns each packed int4 layer back into a dense
bfloat16 weight for the matmul. This times that for every such layer of the model, through the
torch ops and through the kernel (best of 5 passes over all layers), checks that both give the
same bits, and prints the totals and their ratio.
"""

from __future__ import annotations

import sys

import torch

import qkv
from qkv.bench import best_time
from qkv.nn import quant


def main() -> None:
    model = qkv.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct")
    layers = [m for m in model.modules() if isinstance(m, quant.QuantLinear) and m._released and not m._kernel[4]]
    if not layers:
        raise SystemExit("no packed int4 layers in this model")
    native = quant._int4_dense_native
    if not native(*_probe(layers[0])):
        raise SystemExit(f"the C kernel is not built here: {quant.kernels.unavailable('int4_dense')}")

    def every_layer():  # each weight dropped after use, as a forward does (its memory is reused)
        for layer in layers:
            layer._dense_weight(torch.bfloat16)

    fast = best_time(every_layer, 5)
    built = [layer._dense_weight(torch.bfloat16) for layer in layers]
    try:
        quant._int4_dense_native = lambda *a: False  # the torch ops
        slow = best_time(every_layer, 5)
        same = all(torch.equal(a, layer._dense_weight(torch.bfloat16)) for a, layer in zip(built, layers))
    finally:
        quant._int4_dense_native = native
    params = sum(layer.in_features * layer.out_features for layer in layers)
    print(f"threads {torch.get_num_threads()}, {len(layers)} layers, {params / 1e6:.1f}M weights")
    print(f"torch ops {slow * 1e3:.1f} ms, C kernel {fast * 1e3:.1f} ms: {slow / fast:.1f}x; bit-identical: {same}")


def _probe(layer: quant.QuantLinear):
    _, packed, group, scales_and_zeros, _ = layer._kernel
    out = torch.empty(layer.out_features // 64, layer.in_features, 64, dtype=torch.bfloat16)
    return packed, scales_and_zeros, out, layer.out_features, layer.in_features, group


if __name__ == "__main__":
    main()
