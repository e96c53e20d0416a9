"""`qkv finetune --task classification --model MODEL --data FILE --steps N`: fine-tune an encoder.

MODEL is a pre-trained encoder (a known name such as all-minilm-l6-v2, an HF directory, or a qkv
checkpoint, e.g. one `qkv train --objective mlm|rtd` wrote); a classification head for the data's
labels is put on its body. FILE holds one labelled example per line:

  *.tsv, *.txt   LABEL<TAB>TEXT          (the label first, so the text may hold tabs)
  *.jsonl        {"text": "...", "label": "..."}

--val FILE (same format) is the held-out set; without it a seeded --val-fraction of FILE is held
out. The run directory (--out) gets metrics.jsonl (eval accuracy included), loss_curve.png and
checkpoint/, which `qkv classify` and `qkv.load` read; the label names are saved in its
config.json (config.extra.labels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qkv.cli.args import non_negative_float, positive_int
from qkv.cli.train import add_training_arguments, summary, training_config
from qkv.training.classification import label_names_of, read_labelled
from qkv.training.finetune import TASKS, finetune


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune an encoder on labelled texts", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--task", choices=TASKS, required=True, help="what to fine-tune for")
    p.add_argument("--model", required=True, help="pre-trained encoder: known name, HF directory or qkv checkpoint")
    p.add_argument("--data", required=True, metavar="FILE", help="training examples (.tsv LABEL<TAB>TEXT or .jsonl)")
    p.add_argument("--val", default=None, metavar="FILE", help="held-out examples, same format")
    p.add_argument("--val-fraction", type=non_negative_float, default=0.1, help="held out of --data without --val")
    p.add_argument("--max-len", type=positive_int, default=128, help="tokens per example; longer texts are cut")
    add_training_arguments(p, out_default="runs/finetune-<model>", batch_size=16, lr=5e-5, weight_decay=0.01)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or Path("runs") / f"finetune-{Path(args.model).name}")
    val = read_labelled(args.val) if args.val else None
    trainer = finetune(
        args.model, read_labelled(args.data), training_config(args, out), val=val, val_fraction=args.val_fraction,
        max_len=args.max_len, batch_size=args.batch_size, seed=args.seed, resume=args.resume,
    )  # fmt: skip
    print(f"labels: {', '.join(label_names_of(trainer.model))}")
    print(summary(trainer, out))
    return 0
