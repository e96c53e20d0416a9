"""Gradient checkpointing: peak memory (RSS) and time of a training step, with and without.

    python benchmarks/grad_checkpoint.py [--preset smollm2-135m] [--batch 4] [--seq 512] [--steps 2]

Each side runs in a fresh subprocess (so neither inherits the other's heap): a randomly
initialised model of the preset (SmolLM2-135M's shape by default: 30 layers, d_model 576, 135M
parameters), float32, `--steps` AdamW steps of causal-LM loss on random tokens, through the same
`Trainer` as every qkv run. The child reports `ru_maxrss` (the process's peak resident memory,
the weights, gradients and optimizer state included) and the time of its last step. Only the
activations kept for backward differ between the two sides, so the saving is theirs; the
checkpointed side pays for it with one more forward per block.

Times are noisy on a shared machine: compare the two columns of one run. The default shape takes
about 8 minutes on 2 busy cores (a step of 4 x 512 tokens is ~100 s there); `--seq 256` is quicker.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(args: argparse.Namespace) -> None:
    import torch

    from qkv import DecoderLM, ModelConfig
    from qkv.models.stack import set_grad_checkpointing
    from qkv.training import BlockLoader, Trainer, TrainingConfig

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name(args.preset))
    set_grad_checkpointing(model, args.checkpoint)
    blocks = torch.randint(0, model.config.vocab_size, (args.batch * args.steps, args.seq))
    config = TrainingConfig(steps=args.steps, lr=1e-4, warmup_steps=0, progress=False)
    trainer = Trainer(model, config, BlockLoader(blocks, args.batch, shuffle=False))
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        record = trainer.train_step()
        seconds.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"peak_mib": peak_kib / 1024, "step_s": seconds[-1], "loss": record["loss"], "params": params}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="the first step also allocates the optimizer state")
    p.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)  # the child's side
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    shape = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    results = {}
    for name, extra in (("without", []), ("with", ["--checkpoint"])):
        out = subprocess.run([sys.executable, __file__, "--child", *shape, *extra], check=True, capture_output=True,
                             text=True)  # fmt: skip
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = results["without"], results["with"]
    print(f"{args.preset} ({a['params'] / 1e6:.0f}M parameters), float32, batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} AdamW steps; torch threads: default")  # fmt: skip
    print("| gradient checkpointing | peak RSS | last step | loss |")
    print("|---|---|---|---|")
    for name, r in (("off", a), ("on", b)):
        print(f"| {name} | {r['peak_mib']:,.0f} MiB | {r['step_s']:.1f} s | {r['loss']:.4f} |")
    saved = a["peak_mib"] - b["peak_mib"]
    print(f"saving: {saved:,.0f} MiB ({saved / a['peak_mib']:.0%} of the peak); "
          f"step time x{b['step_s'] / a['step_s']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
