"""Decode-step attention: inductor's own code vs the C kernel (`qkv/kernels/attention.c`), by batch.

    python benchmarks/attention_step.py [--layers 4] [--filled 100] [--batches 1,2,4,8,16]

A SmolLM2-shaped decoder (the `smollm2-135m` preset cut to --layers layers and a 1,024-token
vocabulary, so that the head does not drown the layers; random weights, quantized to int4 and run
in bfloat16 as a packed GGUF model is) takes compiled static-cache decode steps, as `generate`
runs them, with --filled of its 256 cache slots in use. For each batch size it prints the
best-of-50 step time with the kernel off and on, and their ratio. The kernel is measured inside
the compiled step on purpose: alone, an attention call is about as fast through inductor; in the
step, inductor fuses it with the rotary embedding and the cache write. `NATIVE_MIN_BATCH` in
`qkv/nn/attention.py` is where the kernel starts to win. The first run compiles each graph.
"""

from __future__ import annotations

import argparse

import torch

from qkv.bench import best_time
from qkv.config import ModelConfig
from qkv.generation.static_step import StaticStep
from qkv.kernels import ops
from qkv.models.decoder import DecoderLM
from qkv.nn import attention
from qkv.nn.quant import prepare_model, quantize_model


def step_ms(model: DecoderLM, batch: int, filled: int, native: bool, repeats: int = 50) -> float:
    saved = attention.NATIVE_MIN_BATCH
    attention.NATIVE_MIN_BATCH = 1 if native else 1 << 30
    try:
        runner = StaticStep(model, compile=True)
        cache = runner.new_cache(batch, filled + 1)
        token = torch.zeros(batch, dtype=torch.long)
        with torch.no_grad():
            return best_time(lambda: runner.step(token, filled, cache), repeats) * 1e3
    finally:
        attention.NATIVE_MIN_BATCH = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--filled", type=int, default=100)
    p.add_argument("--batches", default="1,2,4,8,16")
    args = p.parse_args()
    if not ops.single_query_available():
        raise SystemExit("the C kernels are not built here (see qkv.kernels.unavailable)")
    print(f"threads {torch.get_num_threads()}, {args.layers} layers, {args.filled} of 256 slots filled; ms a step")
    print(f"{'batch':>5} {'inductor':>9} {'kernel':>9} {'ratio':>7}")
    for batch in (int(b) for b in args.batches.split(",")):
        sides = []
        for native in (False, True):  # a model of its own per side: one compiled step each
            torch.manual_seed(0)
            cfg = ModelConfig.from_name("smollm2-135m", n_layers=args.layers, vocab_size=1024)
            model = prepare_model(quantize_model(DecoderLM(cfg).eval(), "int4").to(torch.bfloat16))
            sides.append(step_ms(model, batch, args.filled, native))
        print(f"{batch:>5} {sides[0]:>9.2f} {sides[1]:>9.2f} {sides[0] / sides[1]:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
