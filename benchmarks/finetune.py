"""Fine-tuning report: which standard-library package does this function come from?

    python benchmarks/finetune.py [--steps 300] [--max-len 128] [--out runs/finetune-report]

The task (`qkv.training.stdlib_task`): every function of eight packages of the Python standard
library on this machine (asyncio, email, importlib, multiprocessing, tkinter, unittest, urllib,
xml), its source cut to 400 characters, labelled with its package; the held-out split takes whole
files (no file gives examples to both), at most 300 training and 100 held-out functions a package.
It is written to <out>/train.jsonl and <out>/test.jsonl, which `qkv finetune --data/--val` read.

Held-out accuracy of:
- the majority class of the training split;
- bag-of-words logistic regression (`BagOfWordsClassifier`: L2 chosen on 20% of the training split);
- all-MiniLM-L6-v2 (`qkv.load`) with a classification head on its pooler, fine-tuned;
- the same architecture and tokenizer, randomly initialised, trained on the same examples.

Both transformers train `--steps` updates of 16 examples (AdamW, warmup 10%, cosine, weight decay
0.01; learning rate 1e-4 for MiniLM, 5e-4 from scratch, each the usual choice for its case),
with bfloat16 autocast where the CPU computes in bfloat16 natively. Prints a markdown table,
draws <out>/accuracy.png, and leaves each run's metrics.jsonl, loss_curve.png and checkpoint/
under <out> (`qkv classify <out>/minilm/checkpoint "def ..."` labels a function).

Time: a MiniLM step of 16 x 128 tokens takes ~0.45 s on a quiet 2-core CPU with bfloat16, so the
whole report takes about 5 minutes there (`--steps 150` halves it, at some cost in accuracy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def bf16_is_native() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (else autocast would slow it down)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def draw(rows: list[tuple[str, float, float]], path: Path) -> Path:
    """A horizontal bar per method: held-out accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 0.6 * len(rows) + 1.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [name for name, _, _ in rows][::-1]
    values = [accuracy for _, accuracy, _ in rows][::-1]
    bars = ax.barh(names, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in values], padding=3)
    ax.set_xlim(0, 1)
    ax.set_xlabel("held-out accuracy (functions from files never trained on)")
    ax.set_title("Which standard-library package is this function from?", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="updates of 16 examples per transformer")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per function, [CLS] and [SEP] included")
    parser.add_argument("--out", default="runs/finetune-report", help="where data, runs and the chart go")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="bfloat16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import qkv
    from qkv.models import Encoder
    from qkv.training import TrainingConfig, finetune, write_labelled
    from qkv.training.baselines import BagOfWordsClassifier, majority_accuracy
    from qkv.training.stdlib_task import package_task

    out = Path(args.out)
    if (out / "minilm").exists() or (out / "scratch").exists():
        print(f"{out} holds an earlier report's runs; remove it or pass another --out", file=sys.stderr)
        return 2
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and bf16_is_native())
    start = time.perf_counter()
    task = package_task(seed=args.seed)
    write_labelled(out / "train.jsonl", task.train)
    write_labelled(out / "test.jsonl", task.test)
    labels = task.train.label_names()
    print(f"task: {len(labels)} packages, {len(task.train)} training functions from {len(task.train_files)} files, "
          f"{len(task.test)} held-out functions from {len(task.test_files)} other files "
          f"({time.perf_counter() - start:.1f} s); bf16 autocast {'on' if bf16 else 'off'}; "
          f"{torch.get_num_threads()} threads")  # fmt: skip

    rows: list[tuple[str, float, float]] = []
    rows.append(("majority class", majority_accuracy(task.train.labels, task.test.labels), 0.0))
    clock = time.perf_counter()
    bow = BagOfWordsClassifier(seed=args.seed).fit(task.train.texts, task.train.labels)
    rows.append(("bag-of-words logistic regression", bow.accuracy(task.test.texts, task.test.labels),
                 time.perf_counter() - clock))  # fmt: skip

    pretrained = qkv.load("all-minilm-l6-v2")
    torch.manual_seed(args.seed)
    scratch = Encoder(pretrained.config)
    scratch.tokenizer = pretrained.tokenizer
    for name, model, lr, run in (
        ("all-MiniLM-L6-v2, fine-tuned", pretrained, 1e-4, "minilm"),
        ("same architecture, from scratch", scratch, 5e-4, "scratch"),
    ):
        print(f"\n{name}:")
        config = TrainingConfig(steps=args.steps, lr=lr, warmup_steps=args.steps // 10, weight_decay=0.01,
                                bf16=bf16, out_dir=str(out / run))  # fmt: skip
        clock = time.perf_counter()
        trainer = finetune(model, task.train, config, val=task.test, max_len=args.max_len, batch_size=16,
                           seed=args.seed)  # fmt: skip
        rows.append((name, trainer.history[-1]["eval_accuracy"], time.perf_counter() - clock))

    print("\n| model | held-out accuracy | time (s) |\n|---|---:|---:|")
    for name, accuracy, seconds in rows:
        print(f"| {name} | {accuracy:.1%} | {seconds:.0f} |")
    chart = draw(rows, out / "accuracy.png")
    error = (0.7 * 0.3 / len(task.test)) ** 0.5
    print(f"\n{len(task.test)} held-out functions (one standard error at 70% accuracy: {error:.1%}); "
          f"chart: {chart}; total {time.perf_counter() - start:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
