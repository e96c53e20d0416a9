"""`make demo`: the whole story on one CPU in a few minutes.

Trains a byte-level BPE tokenizer and a small GPT on the Python standard library's own source
files (present on every machine), prints the validation perplexity, writes Python code from a
few prompts (greedy and sampled), and draws the loss curve and an attention map under
`runs/demo/`. Run it with `python -m qkv.demo [--steps N] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

PROMPTS = ("def fibonacci(n):", "import os\n\n\ndef list_files(path):", "class Stack:\n    def __init__(self):")


def stdlib_sources(max_bytes: int) -> list[Path]:
    """Python files of the standard library (no tests, no site-packages), sorted, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            continue
        files.append(path)
        total += size
    if not files:
        raise RuntimeError(f"no Python sources found under {root}")
    return files


def main(argv: list[str] | None = None) -> int:
    from qkv.generation.text import complete
    from qkv.training import TrainingConfig
    from qkv.training.pretrain import pretrain
    from qkv.viz import attention_maps, plot_attention

    parser = argparse.ArgumentParser(prog="python -m qkv.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--corpus-mb", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a demo starts fresh
    start = time.perf_counter()

    files = stdlib_sources(int(args.corpus_mb * 1e6))
    size = sum(f.stat().st_size for f in files)
    print(f"[1/4] corpus: {len(files)} files of the Python standard library, {size / 1e6:.1f} MB")
    print("[2/4] training a byte-level BPE tokenizer and a small GPT (preset tiny-gpt-demo) ...")
    config = TrainingConfig(
        steps=args.steps, lr=2e-3, min_lr=2e-4, warmup_steps=30, weight_decay=0.1, eval_every=max(args.steps // 6, 1),
        eval_batches=8, save_every=0, out_dir=str(out), bf16=True,
    )  # fmt: skip
    trainer = pretrain(files, "tiny-gpt-demo", config, seq_len=128, batch_size=24, vocab_size=4096, val_fraction=0.05)
    model, tok = trainer.model.eval(), trainer.model.tokenizer
    result = trainer.evaluate()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[3/4] trained {n_params / 1e6:.2f}M parameters for {args.steps} steps; "
        f"validation loss {result['eval_loss']:.3f}, perplexity {result['eval_ppl']:.1f}"
    )

    print("[4/4] writing code:")
    for prompt in PROMPTS:
        greedy = complete(model, tok, prompt, max_new_tokens=60, add_special_tokens=False)
        sampled = complete(model, tok, prompt, max_new_tokens=60, temperature=0.8, top_k=40, seed=0,
                           add_special_tokens=False)  # fmt: skip
        print(f"\n--- greedy: {prompt!r}\n{prompt}{greedy.text}")
        print(f"--- sampled (temperature 0.8, top-k 40, seed 0): {prompt!r}\n{prompt}{sampled.text}")

    curve = trainer.plot()
    ids = tok.encode(PROMPTS[0], add_special_tokens=False)
    weights = attention_maps(model, torch.tensor([ids]))
    attn = plot_attention(weights, [tok.decode([i]) for i in ids], out / "attention.png", title=PROMPTS[0])
    print(f"\nloss curve:    {curve}\nattention map: {attn}\ncheckpoint:    {out / 'checkpoint'}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
