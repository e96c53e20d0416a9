"""Load time: SmolLM2-135M-Instruct's GGUF file (Q4_1) -> a ready float32 model with its tokenizer.

qkv:           qkv.load(path, dequantize=True)      (model.tokenizer comes with it; the packed
               default is timed by benchmarks/cpu_speed.py)
transformers:  AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32)
               + AutoTokenizer.from_pretrained(dir, gguf_file=name)

Every load runs in a fresh Python process, so nothing one load leaves in memory (imported modules,
allocator pools, caches) helps the next; the libraries are imported before the clock starts (the
import times are printed apart). The contenders alternate within each round; each one's fastest
round counts. The goal is qkv in at most a fifth of transformers' time; the run exits 1 if not.

    python benchmarks/load.py [--repeats 3] [--threads N]

On a shared machine, --threads 1 keeps other processes from stalling torch's thread pool.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GOAL = 0.2  # qkv's time / transformers' time
CONTENDERS = ("qkv", "transformers")


def worker(name: str, path: str, threads: int | None) -> dict:
    """Import `name`, then load the model and tokenizer once; the timings and peak memory."""
    start = time.perf_counter()
    import torch

    if threads:
        torch.set_num_threads(threads)
    if name == "qkv":
        import qkv

        imported = time.perf_counter()
        model = qkv.load(path, dequantize=True)  # dense float32, as transformers loads it
        assert model.tokenizer is not None
    else:
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        imported = time.perf_counter()
        file = Path(path)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    loaded = time.perf_counter()
    assert next(model.parameters()).dtype == torch.float32
    return {
        "import_s": imported - start,
        "load_s": loaded - imported,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def run_worker(name: str, path: str, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--path", path]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each contender's fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each process (default: torch's)")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.threads)))
        return 0

    from qkv.hub import pull

    path = str(pull("smollm2-135m-instruct"))
    print(f"model: {path}", file=sys.stderr)
    best: dict[str, dict] = {}
    for round_ in range(args.repeats):
        order = CONTENDERS if round_ % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            result = run_worker(name, path, args.threads)
            print(f"  round {round_ + 1}/{args.repeats}: {name:<12} load {result['load_s']:6.2f} s  "
                  f"(import {result['import_s']:.2f} s, peak {result['peak_rss_mb']:.0f} MB, "
                  f"{result['threads']} threads)", file=sys.stderr, flush=True)  # fmt: skip
            if name not in best or result["load_s"] < best[name]["load_s"]:
                best[name] = result
    ratio = best["qkv"]["load_s"] / best["transformers"]["load_s"]
    for name in CONTENDERS:
        print(f"{name:<12} {best[name]['load_s']:6.2f} s  (import {best[name]['import_s']:.2f} s, "
              f"peak {best[name]['peak_rss_mb']:.0f} MB)")  # fmt: skip
    print(f"qkv / transformers: {ratio:.3f} ({1 / ratio:.1f}x faster; goal: <= {GOAL})")
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
