"""Prefill attention: torch's fused kernel vs qkv's block-causal matmuls and its C kernel, by length.

    python benchmarks/prefill_attention.py [--lengths 64,128,256,512,1024,2048,4096] [--repeats 10]

One layer's causal self-attention over a bfloat16 prompt, SmolLM2's shape (9 query heads sharing
3 kv heads, head dim 64, batch 1), at the default thread count. For each length it prints the best
time of each path (torch's fused kernel; the torch blocks, `_forward_blocks`; the C kernel,
`qkv/kernels/causal_attention.c`, where it is built), the fused kernel's time over each of ours,
and the largest difference of each from a float64 reference. A prefill takes the C kernel up to
`NATIVE_MAX_TOKENS`, else the blocks between `PREFILL_MIN_TOKENS` and `PREFILL_MAX_TOKENS`
(`qkv/nn/causal_attention.py`); `--block` sets the blocks' rows.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

import qkv.nn.causal_attention as blocked
from qkv.bench import best_time


def _first(fn, *args):
    return fn(*args)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="64,128,256,512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=blocked.BLOCK, help="query rows per block")
    args = parser.parse_args()
    blocked.BLOCK = args.block
    H, KV, hd = args.heads, args.kv_heads, args.head_dim
    print(f"threads {torch.get_num_threads()}, heads {H}/{KV}, head dim {hd}, bfloat16, batch 1, block {args.block}")
    native = blocked.native_available()
    print(f"{'tokens':>7} {'fused ms':>9} {'blocks ms':>10} {'kernel ms':>10} {'f/blocks':>9} {'f/kernel':>9} "
          f"{'fused err':>10} {'blocks err':>11} {'kernel err':>11}")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for T in (int(t) for t in args.lengths.split(",")):
        q, k, v = (torch.randn(1, n, T, hd, generator=gen).to(torch.bfloat16) for n in (H, KV, KV))
        fused = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
        blocks = functools.partial(_first, blocked._forward_blocks, q, k, v, hd**-0.5, False)
        paths = [fused, blocks] + ([functools.partial(blocked._native, q, k, v, hd**-0.5)] if native else [])
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
            errs = [(f().double() - ref).abs().max().item() for f in paths] + [float("nan")] * (3 - len(paths))
            times = [best_time(f, args.repeats) * 1e3 for f in paths] + [float("nan")] * (3 - len(paths))
        print(f"{T:>7} {times[0]:>9.2f} {times[1]:>10.2f} {times[2]:>10.2f} {times[0] / times[1]:>8.2f}x "
              f"{times[0] / times[2]:>8.2f}x {errs[0]:>10.4f} {errs[1]:>11.4f} {errs[2]:>11.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
