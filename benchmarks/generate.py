"""Decode speed: qkv vs Hugging Face `transformers` on the same SmolLM2 weights, same dtype, same run.

    python benchmarks/generate.py [--dtype bfloat16|float32] [--new-tokens 128] [--batch 16] [--repeats 2]

qkv loads SmolLM2-135M-Instruct from its GGUF file (dequantized to `--dtype`: dense against dense;
benchmarks/cpu_speed.py measures the packed 4-bit path against llama.cpp) and exports the very
same weights as a Hugging Face directory, which `transformers` loads as a plain LlamaForCausalLM
in the same dtype (its GGUF path would keep the weights packed and compute differently). Both
generate greedily with EOS disabled so both produce exactly `--new-tokens` tokens, and are timed
alternately (best of `--repeats`) so machine load hits both alike. Prints tokens/s and the ratio
for batch-1 decode and for batched throughput.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    import transformers

    import qkv
    from qkv.bench import best_time
    from qkv.checkpoints.hf import export_hf
    from qkv.hub import pull

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = Path(pull("smollm2-135m-instruct"))
    print(f"loading SmolLM2-135M-Instruct ({args.dtype}) in qkv and transformers ...", flush=True)
    ours = qkv.load(path, dtype=args.dtype, dequantize=True)  # dense, as transformers gets it
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(qkv.load(path, dequantize=True), Path(tmp) / "hf")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).eval()
    tok = ours.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a robot."}])
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    n = args.new_tokens
    print(f"prompt: {ids.shape[1]} tokens; generating {n} tokens greedily, threads={torch.get_num_threads()}")

    def run_qkv(batch_ids, compile=False):
        return ours.generate(batch_ids, max_new_tokens=n, eos_token_id=[], compile=compile)

    def run_hf(batch_ids):
        with torch.no_grad():
            return theirs.generate(batch_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0)  # fmt: skip

    # Same tokens on both sides (greedy, same weights): a cheap correctness check before timing.
    a, b = run_qkv(ids[:, :]), run_hf(ids)
    same = int((a[0, ids.shape[1] :] == b[0, ids.shape[1] :]).cumprod(0).sum())
    print(f"greedy agreement: first {same}/{n} generated tokens identical")

    rows = []
    for label, batch in (("batch 1 decode", 1), (f"batch {args.batch} throughput", args.batch)):
        batch_ids = ids.expand(batch, -1).contiguous()
        print(f"compiling the static decode step for batch {batch} (once per shape) ...", flush=True)
        start = time.perf_counter()
        compiled = run_qkv(batch_ids, compile=True)[0, ids.shape[1] :]
        eager = run_qkv(batch_ids)[0, ids.shape[1] :]
        agree = int((compiled == eager).cumprod(0).sum())
        # In bf16 the fused kernels round differently, so long greedy runs may part (fp32: equal, tested).
        print(f"  compiled in {time.perf_counter() - start:.0f} s; first {agree}/{n} tokens equal to eager qkv")
        print(f"timing {label} ...", flush=True)
        t_q = t_c = t_h = float("inf")
        for _ in range(args.repeats):  # alternate so load spikes hit all three
            t_q = min(t_q, best_time(lambda b=batch_ids: run_qkv(b), 1, warm_up=False))
            t_c = min(t_c, best_time(lambda b=batch_ids: run_qkv(b, compile=True), 1, warm_up=False))
            t_h = min(t_h, best_time(lambda b=batch_ids: run_hf(b), 1, warm_up=False))
        rows.append((label, batch * n / t_q, batch * n / t_c, batch * n / t_h))
    print(f"\n{'':24} {'qkv tok/s':>10} {'compiled':>10} {'HF tok/s':>10} {'qkv/HF':>8} {'compiled/HF':>12}")
    for label, q, c, h in rows:
        print(f"{label:24} {q:10.1f} {c:10.1f} {h:10.1f} {q / h:7.2f}x {c / h:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
