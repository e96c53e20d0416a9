"""Quality of the packed 4-bit path: perplexity of SmolLM2-135M-Instruct Q4_1 in qkv vs llama.cpp vs
the same weights dequantized to float32, on the same ~21k-token held-out text.

    python benchmarks/quality.py [--peer-python /work/peer-venv/bin/python] [--window 512] [--threads N]

- qkv: `qkv.load(file.gguf)`, the default path (packed int4, bfloat16 activations);
- llama.cpp: llama-cpp-python under --peer-python (`qkv/peers/llama_cpp_runner.py ppl`), the same ids;
- qkv fp32: `qkv.load(file.gguf, dequantize=True, dtype="float32")`.
The text is `qkv.evaluation.heldout_text()` (docstrings of standard-library modules), scored by
`qkv.evaluation.perplexity`'s protocol (non-overlapping windows, each from an empty context), which
the runner shares. The issue's targets: qkv within 1% of llama.cpp and within 2% of float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PEER = "/work/peer-venv/bin/python"


def llama_cpp_perplexity(python: str, gguf: Path, ids: list[int], window: int, threads: int) -> float:
    from qkv.bench import RUNNER

    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps({"ids": ids, "window": window}))
        cmd = [python, str(RUNNER), "ppl", "--model", str(gguf), "--threads", str(threads), "--ids-file", str(ids_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the llama.cpp runner failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)["ppl"]


def main() -> int:
    import torch

    import qkv
    from qkv.bench import check_peer_python, gguf_file
    from qkv.evaluation import heldout_text, perplexity, print_progress
    from qkv.hub import pull
    from qkv.threads import physical_cores

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", default=DEFAULT_PEER, help=f"interpreter with llama_cpp (default {DEFAULT_PEER})")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="default: the machine's physical cores")
    args = p.parse_args()
    check_peer_python(args.peer_python)
    threads = args.threads or physical_cores()
    os.environ["QKV_THREADS"] = str(threads)  # what qkv.load sets torch's threads to
    torch.set_num_threads(threads)
    path = gguf_file(pull("smollm2-135m-instruct"))
    tok = qkv.load_tokenizer(path)
    ids = tok.encode(heldout_text(), add_special_tokens=False)
    print(f"{path.name}: {len(ids)} held-out tokens, windows of {args.window}, {threads} threads", flush=True)
    ppl = {}
    for name, options in (
        ("qkv (packed Q4_1)", {}),
        ("qkv fp32 (dequantized)", {"dequantize": True, "dtype": "float32"}),
    ):
        start = time.perf_counter()
        print(f"{name} ...", file=sys.stderr, flush=True)
        ppl[name] = perplexity(qkv.load(path, **options), ids, args.window, progress=print_progress).ppl
        print(f"  {name}: {ppl[name]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    start = time.perf_counter()
    ppl["llama.cpp"] = llama_cpp_perplexity(args.peer_python, path, ids, args.window, threads)
    print(f"  llama.cpp: {ppl['llama.cpp']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    ours = ppl["qkv (packed Q4_1)"]
    print(f"\n{'':24} {'perplexity':>10} {'qkv vs it':>10} {'target':>8}")
    for name, target in (("qkv (packed Q4_1)", None), ("llama.cpp", 0.01), ("qkv fp32 (dequantized)", 0.02)):
        if target is None:
            print(f"{name:24} {ppl[name]:10.4f}")
            continue
        diff = ours / ppl[name] - 1
        verdict = "met" if abs(diff) <= target else "MISSED"
        print(f"{name:24} {ppl[name]:10.4f} {diff:+10.2%} {f'±{target:.0%}':>8} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
