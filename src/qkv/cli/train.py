"""`qkv train --corpus FILE... --preset NAME --steps N`: pretrain a decoder LM on text files.

Trains a byte-level BPE tokenizer on the corpus unless --tokenizer is given, then the model.
The run directory (--out) gets metrics.jsonl, loss_curve.png and checkpoint/ (a qkv checkpoint
that `qkv generate` and `qkv.load` read). --resume continues from checkpoint/: run the same
command again with --resume.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qkv.cli.args import non_negative_float, non_negative_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a decoder LM on text files", description=__doc__)
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="text files or directories of *.txt")
    p.add_argument("--preset", required=True, help="model preset, e.g. tiny-gpt2 or tiny-llama (see `qkv models`)")
    p.add_argument("--steps", type=positive_int, required=True, help="optimizer updates to train for")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=None, help="block length (default: min(256, context))")
    p.add_argument("--lr", type=non_negative_float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--min-lr", type=non_negative_float, default=None, help="end of the cosine (default: lr/10)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="warmup steps (default: steps/20)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1)
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per update")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="max grad norm; 0 = no clipping")
    p.add_argument("--eval-every", type=non_negative_int, default=None, help="default: steps/10; 0 = at the end")
    p.add_argument("--save-every", type=non_negative_int, default=None, help="default: steps/10; 0 = at the end")
    p.add_argument("--eval-batches", type=positive_int, default=None, help="cap per evaluation (default: all)")
    p.add_argument("--val-fraction", type=non_negative_float, default=0.1, help="share of the corpus held out")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    p.add_argument("--resume", action="store_true", help="continue the run saved in <out>/checkpoint")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer (file or directory) instead of training one")
    p.add_argument("--vocab-size", type=positive_int, default=None, help="BPE vocabulary (default: the preset's)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkv.training.pretrain import pretrain
    from qkv.training.trainer import TrainingConfig

    out = Path(args.out or Path("runs") / args.preset)
    config = TrainingConfig(
        steps=args.steps,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.steps // 20 if args.warmup is None else args.warmup,
        weight_decay=args.weight_decay,
        grad_accum=args.grad_accum,
        grad_clip=args.grad_clip or None,
        bf16=args.bf16,
        eval_every=max(1, args.steps // 10) if args.eval_every is None else args.eval_every,
        save_every=max(1, args.steps // 10) if args.save_every is None else args.save_every,
        eval_batches=args.eval_batches,
        out_dir=str(out),
        progress=not args.quiet,
    )
    trainer = pretrain(
        args.corpus, args.preset, config, seq_len=args.seq_len, batch_size=args.batch_size,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
        seed=args.seed, resume=args.resume,
    )  # fmt: skip
    last = trainer.history[-1] if trainer.history else {}
    summary = f"step {trainer.step}"
    if "eval_loss" in last:
        summary += f": eval loss {last['eval_loss']:.4f}, perplexity {last['eval_ppl']:.2f}"
    print(f"{summary}; checkpoint: {trainer.checkpoint_path}; metrics: {out / 'metrics.jsonl'}")
    return 0
