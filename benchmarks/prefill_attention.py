"""Prefill attention: torch's fused kernel vs qkv's block-causal matmuls (`causal_attention`), by length.

    python benchmarks/prefill_attention.py [--lengths 64,128,256,512,1024,2048,4096] [--repeats 10]

One layer's causal self-attention over a bfloat16 prompt, SmolLM2's shape (9 query heads sharing
3 kv heads, head dim 64, batch 1), at the default thread count. For each length it prints the best
time of each path, their ratio, and the largest difference of each from a float64 reference
(`PREFILL_MIN_TOKENS` and `PREFILL_MAX_TOKENS` in `qkv/nn/causal_attention.py` bound where the
blocks run in a prefill; `--block` sets the rows per block).
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

import qkv.nn.causal_attention as blocked
from qkv.bench import best_time


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
    print(f"{'tokens':>7} {'fused ms':>9} {'blocks ms':>10} {'ratio':>6} {'fused err':>10} {'blocks err':>11}")
    gen = torch.Generator().manual_seed(0)
    for T in (int(t) for t in args.lengths.split(",")):
        q, k, v = (torch.randn(1, n, T, hd, generator=gen).to(torch.bfloat16) for n in (H, KV, KV))
        fused = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
        blocks = functools.partial(blocked.causal_attention, q, k, v, hd**-0.5)
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
            errs = [(f().double() - ref).abs().max().item() for f in (fused, blocks)]
            t_fused, t_blocks = (best_time(f, args.repeats) * 1e3 for f in (fused, blocks))
        print(f"{T:>7} {t_fused:>9.2f} {t_blocks:>10.2f} {t_fused / t_blocks:>5.2f}x {errs[0]:>10.4f} {errs[1]:>11.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
