"""`qkv train --corpus FILE... --preset NAME --steps N [--objective causal|mlm|rtd]`: pretrain on text files.

--objective causal (default) trains a decoder preset (e.g. tiny-gpt2) to predict the next token,
with a byte-level BPE tokenizer trained on the corpus. mlm trains an encoder preset (e.g.
tiny-bert, bert-base) as a masked LM (15% of the tokens chosen; 80% -> [MASK], 10% random, 10%
kept; --whole-word keeps WordPiece words whole); rtd trains ELECTRA: the encoder preset (e.g.
electra-small) as the discriminator with a 1/4-size generator, and saves the discriminator. Both
train a WordPiece tokenizer unless --tokenizer is given. span (T5's span corruption), denoise
(BART's text infilling and sentence permutation) and seq2seq (teacher forcing on a --corpus file of
source<TAB>target lines) train an encoder-decoder preset (tiny-t5, tiny-bart, t5-small, bart-base,
transformer-base) with a byte-level BPE tokenizer holding </s>, <pad>, <mask> and 100 sentinels.
--task image-classification|clip --data digits trains a ViT or a CLIP model on images instead.

The run directory (--out) gets metrics.jsonl, loss_curve.png and checkpoint/ (a qkv checkpoint
that `qkv.load`, `qkv generate` and `qkv finetune` read). --resume continues from checkpoint/:
run the same command again with --resume.

--compile runs the training step through torch.compile: faster steps after a first one that
compiles (a minute or more on a small CPU).

--nproc N trains on N processes (DDP; --shard for FSDP2) by running the same command under
torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N -m qkv.cli.main train
...`); torchrun can also be called directly, e.g. across machines with --nnodes and
--rdzv-endpoint. --batch-size stays the global batch: each process takes batch-size / N rows.
A multi-process run saves a sharded checkpoint (checkpoint/distributed/, through
torch.distributed.checkpoint) next to the plain one, and resumes on any number of processes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from qkv.cli.args import non_negative_float, non_negative_int, positive_int, probability
from qkv.errors import UsageError
from qkv.training import distributed
from qkv.training.pretrain import OBJECTIVES, pretrain
from qkv.training.trainer import Trainer, TrainingConfig, describe_eval
from qkv.training.vision import TASKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a model on text files", description=__doc__)
    p.add_argument("--corpus", nargs="+", default=None, metavar="PATH", help="text files or directories of *.txt")
    p.add_argument("--preset", default=None, help="model preset, e.g. tiny-gpt2 (causal), tiny-bert (mlm, rtd)")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="train on images instead of text: a ViT classifier or a CLIP model (with --data)")  # fmt: skip
    p.add_argument("--data", choices=("digits",), default=None,
                   help="the image data for --task: digits = scikit-learn's 1,797 handwritten digits")  # fmt: skip
    p.add_argument("--objective", choices=OBJECTIVES, default="causal",
                   help="causal: next token (decoder); mlm: masked LM, rtd: ELECTRA (encoder); span: T5, "
                        "denoise: BART, seq2seq: source<TAB>target pairs (encoder-decoder)")  # fmt: skip
    p.add_argument("--mask-prob", type=probability, default=0.15, help="mlm/rtd: share of tokens chosen (0.15)")
    p.add_argument("--whole-word", action="store_true", help="mlm/rtd: choose whole WordPiece words")
    p.add_argument("--val-fraction", type=non_negative_float, default=0.1, help="share of the corpus held out")
    p.add_argument("--seq-len", type=positive_int, default=None, help="block length (default: min(256, context))")
    add_training_arguments(p, out_default="runs/<preset>", batch_size=8, lr=1e-3, weight_decay=0.1)
    p.add_argument("--tokenizer", default=None, help="use this tokenizer (file or directory) instead of training one")
    p.add_argument("--vocab-size", type=positive_int, default=None, help="tokenizer vocabulary (default: the preset's)")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="processes on this machine (launches torchrun; --batch-size stays global)")  # fmt: skip
    p.set_defaults(func=run, parser=p)


def add_training_arguments(
    p: argparse.ArgumentParser, out_default: str, batch_size: int, lr: float, weight_decay: float
) -> None:
    """The run and optimizer flags every training command takes (read by `training_config`)."""
    p.add_argument("--steps", type=positive_int, required=True, help="optimizer updates to train for")
    p.add_argument("--out", default=None, help=f"run directory (default: {out_default})")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"default: {batch_size}")
    p.add_argument("--lr", type=non_negative_float, default=lr, help=f"peak learning rate (default: {lr:g})")
    p.add_argument("--min-lr", type=non_negative_float, default=None, help="end of the cosine (default: lr/10)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="warmup steps (default: steps/20)")
    p.add_argument("--weight-decay", type=non_negative_float, default=weight_decay, help=f"default: {weight_decay:g}")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per update")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="max grad norm; 0 = no clipping")
    p.add_argument("--eval-every", type=non_negative_int, default=None, help="default: steps/10; 0 = at the end")
    p.add_argument("--save-every", type=non_negative_int, default=None, help="default: steps/10; 0 = at the end")
    p.add_argument("--eval-batches", type=positive_int, default=None, help="cap per evaluation (default: all)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step: faster steps after a first one that compiles")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run saved in <out>/checkpoint")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--shard", action="store_true", help="multi-process: FSDP2 (states split over processes), not DDP")
    p.add_argument("--sharded-checkpoint", action="store_true",
                   help="one process: save a sharded checkpoint too (multi-process runs always do)")  # fmt: skip
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block in backward: less memory, more compute")  # fmt: skip


def training_config(args: argparse.Namespace, out: Path) -> TrainingConfig:
    """The `TrainingConfig` of the flags `add_training_arguments` added."""
    return TrainingConfig(
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
        shard=args.shard,
        sharded_checkpoint=True if args.sharded_checkpoint else None,
        grad_checkpoint=args.grad_checkpoint,
        compile=args.compile,
    )


def summary(trainer: Trainer, out: Path) -> str:
    """The last line a training command prints: where it stopped, how it did, where things are."""
    evals = [r for r in trainer.history if "eval_loss" in r]
    line = describe_eval(evals[-1]) if evals else f"step {trainer.step}"
    return f"{line}; checkpoint: {trainer.checkpoint_path}; metrics: {out / 'metrics.jsonl'}"


def run(args: argparse.Namespace) -> int:
    if args.nproc > 1 and distributed.detect().world_size == 1:
        return launch(args, args.nproc)
    if args.task is not None:
        return _train_images(args)
    if not args.corpus or not args.preset:
        raise UsageError("give --corpus and --preset (text), or --task and --data (images)")
    out = Path(args.out or Path("runs") / args.preset)
    try:
        trainer = pretrain(
            args.corpus, args.preset, training_config(args, out), objective=args.objective, seq_len=args.seq_len,
            batch_size=args.batch_size, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, seed=args.seed, resume=args.resume, mask_prob=args.mask_prob,
            whole_word=args.whole_word,
        )  # fmt: skip
        if trainer.dist.is_main:
            print(summary(trainer, out))
    finally:
        distributed.destroy()
    return 0


def launch(args: argparse.Namespace, nproc: int) -> int:
    """Run this same `qkv train` command on `nproc` processes of this machine under torchrun -> its exit code."""
    if args.task is not None:
        raise UsageError("--nproc is for text pretraining (--corpus); --task runs train on one process")
    distributed.split_rows(args.batch_size, distributed.DistEnv(0, nproc))  # before starting any process
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "qkv.cli.main", "train", *command_line(args.parser, args, skip=("nproc",))]  # fmt: skip
    return subprocess.run(command, check=False).returncode


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that give `args` again when parsed by `parser` (those not at their defaults)."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value: Any = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _train_images(args: argparse.Namespace) -> int:
    """`--task image-classification|clip --data digits`: `qkv.training.vision.train_digits`."""
    import json

    from qkv.training.vision import train_digits

    if args.data is None:
        raise UsageError(f"--task {args.task} needs --data (digits)")
    if args.resume:
        raise UsageError("--resume is not available for --task runs yet; start the run again")
    out = Path(args.out or Path("runs") / args.task)
    _, metrics = train_digits(
        args.task, args.steps, out_dir=str(out), batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    metrics.pop("confusion", None)
    print(json.dumps(metrics))
    print(f"checkpoint: {out / 'checkpoint'}; metrics: {out / 'metrics.jsonl'}")
    return 0
