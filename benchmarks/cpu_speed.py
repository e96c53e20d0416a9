"""CPU speed: qkv on SmolLM2's Q4_1 GGUF (kept packed) vs llama.cpp and Hugging Face `transformers`.

    python benchmarks/cpu_speed.py [--peer-python /work/peer-venv/bin/python] [--repeats 3] [--threads N]
                                   [--no-extra-bufts]

Three sides, each measured by `qkv.bench` (every number in a fresh process, best of --repeats):
- qkv: `qkv.load(file.gguf)`, the default path (packed weights, bfloat16 activations);
- llama.cpp: llama-cpp-python under --peer-python (`qkv/peers/llama_cpp_runner.py`), on the same
  file, same prompt ids and thread count (n_threads = n_threads_batch = --threads);
- transformers: the same weights dequantized (`qkv.load(file, dequantize=True)`), exported with
  `export_hf` and loaded by `AutoModelForCausalLM` in bfloat16.
Rows: batch-1 decode (128 greedy tokens), prefill of 512 tokens, batch 16 (64 tokens each), load,
peak RSS, and qkv's first and second start (a new process to its first decoded token) with an
EMPTY compile cache before the first: QKV_HOME and TORCHINDUCTOR_CACHE_DIR point at a temporary
directory (models/ there links to the real one, so nothing is fetched again). Prints the numbers
and the ratios qkv/llama.cpp and qkv/transformers (tok/s: higher is better; s, MB: lower).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

DEFAULT_PEER = "/work/peer-venv/bin/python"


def table(labels: dict[str, str], units: dict[str, str], sides: dict[str, dict]) -> str:
    names = list(sides)
    lines = [f"{'':14} {'unit':>6}" + "".join(f" {n:>12}" for n in names)
             + "".join(f" {'qkv/' + n:>16}" for n in names[1:])]  # fmt: skip
    for key, label in labels.items():
        values = [sides[n].get(key) for n in names]
        cells = "".join(f" {'-' if v is None else f'{v:.2f}' if v < 10 else f'{v:.1f}':>12}" for v in values)
        ratios = "".join(f" {'-' if not v else f'{values[0] / v:.2f}x':>16}" for v in values[1:])
        lines.append(f"{label:14} {units[key]:>6}{cells}{ratios}")
    return "\n".join(lines)


def main() -> int:
    import torch
    import transformers

    import qkv
    from qkv.bench import METRICS, BenchConfig, bench_ids, check_peer_python, gguf_file, measure, measure_peer
    from qkv.checkpoints.hf import export_hf
    from qkv.hub import pull, qkv_home

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", default=DEFAULT_PEER, help=f"interpreter with llama_cpp (default {DEFAULT_PEER})")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: the machine's physical cores")
    p.add_argument("--no-extra-bufts", action="store_true", help="llama.cpp without its extra buffer types")
    args = p.parse_args()
    check_peer_python(args.peer_python)
    config = BenchConfig(repeats=args.repeats, threads=args.threads, extra_bufts=not args.no_extra_bufts)
    path = gguf_file(pull("smollm2-135m-instruct"))
    prompt, prefill = bench_ids(path, config.prefill_tokens)
    load1 = os.getloadavg()[0]
    print(f"SmolLM2-135M-Instruct {path.name}; {len(prompt)}-token prompt; {config.n_threads} threads; "
          f"load average {load1:.2f}", flush=True)  # fmt: skip
    sides: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qkv-cpu-speed-") as tmp:
        home = Path(tmp) / "qkv_home"
        home.mkdir()
        (home / "models").symlink_to(qkv_home() / "models", target_is_directory=True)
        fresh = {"QKV_HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(home / "compile")}
        sides["qkv"] = measure(path, config, prompt, prefill, env=fresh)
        sides["llama.cpp"], peer_info = measure_peer(path, config, prompt, prefill, args.peer_python)
        hf_dir = Path(tmp) / "hf"
        export_hf(qkv.load(path, dequantize=True), hf_dir)
        hf_config = BenchConfig(repeats=args.repeats, threads=args.threads, dtype="bfloat16")
        sides["transformers"] = measure(hf_dir, hf_config, prompt, prefill, backend="transformers")
    units = dict(METRICS)
    bufts = "on" if peer_info["extra_bufts"] else "off"
    print(f"\nqkv {qkv.__version__} (torch {torch.__version__}), llama-cpp-python {peer_info['llama_cpp']} "
          f"(n_threads = n_threads_batch = {peer_info['threads']}, extra bufts {bufts}), "
          f"transformers {transformers.__version__} (bfloat16); {platform.processor() or platform.machine()}, "
          f"load average {load1:.2f} before, {os.getloadavg()[0]:.2f} after")  # fmt: skip
    print(table(config.labels(), units, sides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
