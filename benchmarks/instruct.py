"""Instruction fine-tuning report: SmolLM2-135M-Instruct taught to explain standard-library functions.

    python benchmarks/instruct.py [--steps 30] [--lora] [--out runs/instruct-report]

The same run as `qkv finetune smollm2-135m-instruct --task instruct --steps 30 --bf16`: the chats
of `qkv.training.instruct.explain_function_task` ("Explain what this Python function does:" + a
short stdlib function without its docstring -> the docstring's first paragraph; 512 training and
32 held-out chats, the held-out ones from modules never trained on), rendered with SmolLM2's own
chat template, loss on the assistant's tokens only. `--steps` AdamW updates of 4 chats (learning
rate 5e-5, or 5e-4 for LoRA's adapters; warmup 5%, cosine), with bfloat16 autocast where the CPU
computes in bfloat16 natively.

Prints the held-out loss (mean over held-out batches of the loss per assistant token) before and
after, the wall time, and one held-out function with its docstring and the model's greedy answer
before and after. The run directory gets metrics.jsonl, loss_curve.png and checkpoint/ (adapter/
with --lora).

Time: on 2 cores shared with other jobs (bfloat16) the default run took 775 s, of which 476 s
were the 30 steps (4 to 59 s each, by metrics.jsonl's tokens_per_s); the rest is loading, the
data, two evaluations of the held-out chats and the sample answers.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from finetune import bf16_is_native

from qkv.training import TrainingConfig
from qkv.training.instruct import InstructTask, instruct_finetune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: 5e-5, or 5e-4 with --lora")
    p.add_argument("--lora", action="store_true", help="train rank-8 adapters on q, k, v, o instead of every weight")
    p.add_argument("--out", default="runs/instruct-report", help="run directory (replaced)")
    args = p.parse_args()

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    lora = None
    if args.lora:
        from qkv.nn.lora import LoraConfig

        lora = LoraConfig()
    lr = args.lr or (5e-4 if args.lora else 5e-5)
    bf16 = bf16_is_native()
    config = TrainingConfig(steps=args.steps, lr=lr, warmup_steps=args.steps // 20, weight_decay=0.01, bf16=bf16,
                            out_dir=str(out), progress=False)  # fmt: skip
    start = time.perf_counter()
    result = instruct_finetune(args.model, config, task=InstructTask(), batch_size=args.batch_size, lora=lora)
    seconds = time.perf_counter() - start
    s = result.sample
    kind = f"LoRA r={lora.rank} alpha={lora.alpha:g} on {', '.join(lora.targets)}" if lora else "full fine-tuning"
    precision = "bf16 autocast" if bf16 else "float32"
    print(f"{args.model}: {kind}, {args.steps} steps of {args.batch_size} chats, lr {lr:g}, {precision}, "
          f"{torch.get_num_threads()} threads, {seconds:.0f} s in all")  # fmt: skip
    print(f"chats: {result.n_train} training, {result.n_test} held out (modules never trained on)")
    print(f"held-out loss on the assistant tokens: {result.loss_before:.3f} before -> {result.loss_after:.3f} after")
    print(f"\nheld-out function ({s.origin}):\n{s.prompt.split(chr(10), 2)[2]}")
    print(f"docstring: {s.reference}\nbefore:    {s.answer_before}\nafter:     {s.answer_after}")
    print(f"\n{'adapter' if lora else 'checkpoint'}: {result.saved}")


if __name__ == "__main__":
    main()
