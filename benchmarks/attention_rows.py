"""Attention weights of a long prompt: the plain forward, the rows path and the eager path, by time and memory.

    python benchmarks/attention_rows.py [--model smollm2-135m-instruct] [--lengths 2048] [--rows 1,64]

For each prompt length, SmolLM2-135M in bfloat16 runs one forward over random tokens (batch 1,
the last position's logits only) three ways:
- plain: no attention weights (the fused/blocked fast path);
- R rows: `output_attentions=True, attention_rows=<the last R positions>`: every layer's
  weights [1, H, R, T] for those rows, computed beside the fast path;
- eager: `output_attentions=True`: every layer's full weights [1, H, T, T] from the eager backend.
Time: one subprocess runs the plain and rows paths in turn, `--repeats` rounds after a warm-up
round, and keeps each path's best (interleaved, so a busy spell on a shared machine hits every
path alike); the eager path is timed in a subprocess of its own (freeing its gigabytes of
weights made whichever path ran next pay for fresh pages: 2x slower in one trial).
Memory: each path runs once in a fresh subprocess, which reports its peak RSS (`ru_maxrss`)
above its RSS once the model is loaded (a few tens of MiB of it are the allocator's noise).
One layer: the cost of the rows alone, less exposed to a busy machine than whole forwards: one
layer's fast attention (SmolLM2's shape: 9 query heads on 3 kv heads, head dim 64, bfloat16,
causal) against `attention_weights` for R rows over the same keys, best of 10, on one thread
(with two threads on two busy cores, a sub-millisecond call waits out whole scheduler slices).
The eager side holds n_layers x H x T x T bfloat16 weights (2.3 GB at 2,048 tokens, 9 GB at
4,096), so it runs up to `--eager-max` tokens only: mind the machine's memory before raising it.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _kwargs(path: str) -> dict:
    if path == "eager":
        return dict(output_attentions=True)
    if path.startswith("rows"):
        return dict(output_attentions=True, attention_rows=list(range(-int(path[4:]), 0)))
    return {}


def child(args: argparse.Namespace) -> None:
    import torch

    import qkv

    model = qkv.load(args.model, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    paths = args.paths.split(",")
    loaded = _rss_mib()
    best = {p: float("inf") for p in paths}
    with torch.no_grad():
        for round_ in range(args.repeats + 1 if args.time else 1):
            for path in paths:
                start = time.perf_counter()
                out = model(ids, logits_to_keep=1, **_kwargs(path))
                if round_:  # the first round warms up
                    best[path] = min(best[path], time.perf_counter() - start)
                del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"best_s": best, "above_loaded_mib": peak - loaded}))


def layer_costs(lengths: list[int], row_counts: list[int]) -> None:
    import torch

    from qkv.bench import best_time
    from qkv.nn.attention import attention_weights, scaled_dot_product_attention
    from qkv.nn.mask import AttentionMask

    causal = AttentionMask(None, is_causal=True)
    torch.set_num_threads(1)
    header = " | ".join(f"weights of {r} rows" for r in row_counts)
    print(f"\n| tokens | one layer's fast attention (1 thread) | {header} |")
    print("|---|---|" + "---|" * len(row_counts))
    for T in lengths:
        qkv = torch.randn(1, T, 15, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        q, k, v = (x.transpose(1, 2) for x in qkv.split((9, 3, 3), dim=2))  # as the layer holds them
        with torch.no_grad():
            fast = best_time(functools.partial(scaled_dot_product_attention, q, k, v, causal, scale=0.125), 10)
            rows = [best_time(functools.partial(attention_weights, q, k, causal, 0.125, torch.arange(T - r, T)), 10)
                    for r in row_counts]  # fmt: skip
        fast, rows = fast * 1e3, [t * 1e3 for t in rows]
        cells = " | ".join(f"{ms:.2f} ms ({ms / fast:.1%})" for ms in rows)
        print(f"| {T:,} | {fast:.1f} ms | {cells} |", flush=True)


def _run(args: argparse.Namespace, length: int, paths: list[str], time_them: bool) -> dict:
    cmd = [sys.executable, __file__, "--model", args.model, "--length", str(length), "--paths", ",".join(paths),
           "--repeats", str(args.repeats), *(["--time"] if time_them else [])]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--lengths", default="2048")
    p.add_argument("--rows", default="1,64", help="row counts for the rows path, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager-max", type=int, default=2048, help="run the eager path up to this many tokens")
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)  # the child's side
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.paths:
        return child(args)
    paths = ["plain", *(f"rows{r}" for r in args.rows.split(",")), "eager"]
    print(f"{args.model}, bfloat16, batch 1, last position's logits; time: best of {args.repeats} interleaved rounds")
    print("| tokens | path | time | vs plain | peak RSS above the loaded model |")
    print("|---|---|---|---|---|")
    for length in (int(t) for t in args.lengths.split(",")):
        run = [p for p in paths if p != "eager" or length <= args.eager_max]
        times = _run(args, length, [p for p in run if p != "eager"], time_them=True)["best_s"]
        if "eager" in run:
            times.update(_run(args, length, ["eager"], time_them=True)["best_s"])
        for path in run:
            memory = _run(args, length, [path], time_them=False)["above_loaded_mib"]
            name = {"plain": "plain forward", "eager": "eager, full weights"}.get(path, f"{path[4:]} rows")
            print(f"| {length:,} | {name} | {times[path]:.2f} s | {times[path] / times['plain']:.2f}x | "
                  f"{memory:,.0f} MiB |", flush=True)  # fmt: skip
    layer_costs([int(t) for t in args.lengths.split(",")], [int(r) for r in args.rows.split(",")])


if __name__ == "__main__":
    main()
