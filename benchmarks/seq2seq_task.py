"""Encoder-decoder report: restore the spaces of a line of Python.

    python benchmarks/seq2seq_task.py [--steps 1500] [--preset tiny-bart] [--out runs/seq2seq-report]

The task: short lines (20-60 characters, at least two spaces) of the Python standard library on
this machine with every space removed are the sources, the lines themselves the targets
("defrun(self,args):" -> "def run(self, args):"). The held-out lines come from files never trained
on. `qkv train --objective seq2seq` trains the preset on the pairs (written to <out>/train.tsv),
and greedy decoding restores 300 held-out lines. Reports exact match and character BLEU-4 (BLEU,
Papineni et al. 2002, over characters, with the brevity penalty) against the trivial baseline of
copying the source unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
from collections import Counter
from pathlib import Path

import torch

from qkv.training import TrainingConfig
from qkv.training.pretrain import pretrain


def stdlib_lines(max_files: int = 400) -> tuple[list[str], list[str]]:
    """(train, held-out) lines, split by file, deterministic."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_files]
    random.Random(0).shuffle(files)
    cut = int(len(files) * 0.85)
    out = []
    for group in (files[:cut], files[cut:]):
        lines = []
        for f in group:
            for line in f.read_text(encoding="utf-8", errors="ignore").splitlines():
                line = line.strip()
                if 20 <= len(line) <= 60 and line.count(" ") >= 2 and "\t" not in line:
                    lines.append(line)
        out.append(sorted(set(lines)))
    return out[0], out[1]


def char_bleu(hypothesis: str, reference: str, n: int = 4) -> float:
    """Sentence BLEU-n over characters: the geometric mean of the n-gram precisions (orders above 1
    smoothed by adding one, as sentence-level BLEU commonly is) times the brevity penalty."""
    if not hypothesis:
        return 0.0
    log_sum = 0.0
    for k in range(1, n + 1):
        hyp = Counter(hypothesis[i : i + k] for i in range(len(hypothesis) - k + 1))
        ref = Counter(reference[i : i + k] for i in range(len(reference) - k + 1))
        overlap = sum(min(c, ref[g]) for g, c in hyp.items())
        total = sum(hyp.values())
        smooth = 0 if k == 1 else 1
        if overlap + smooth == 0:
            return 0.0
        log_sum += math.log((overlap + smooth) / (total + smooth))
    brevity = min(1.0, math.exp(1 - len(reference) / len(hypothesis)))
    return brevity * math.exp(log_sum / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--preset", default="tiny-bart")
    parser.add_argument("--out", default="runs/seq2seq-report")
    parser.add_argument("--held-out", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = stdlib_lines()
    (out / "train.tsv").write_text("".join(f"{line.replace(' ', '')}\t{line}\n" for line in train), encoding="utf-8")
    test = random.Random(1).sample(test, min(args.held_out, len(test)))
    config = TrainingConfig(steps=args.steps, lr=2e-3, warmup_steps=args.steps // 20, weight_decay=0.01,
                            out_dir=str(out / "run"), eval_every=0, save_every=0)  # fmt: skip
    trainer = pretrain([out / "train.tsv"], args.preset, config, objective="seq2seq", seq_len=128, batch_size=32,
                       vocab_size=1000, val_fraction=0.02)  # fmt: skip
    model = trainer.model.eval()
    tok = model.tokenizer
    restored = []
    for line in test:
        ids = torch.tensor([[*tok.encode(line.replace(" ", "")), model.config.eos_token_id]])
        new = model.generate(ids, max_new_tokens=100)[0, 1:].tolist()
        new = new[: new.index(model.config.eos_token_id)] if model.config.eos_token_id in new else new
        restored.append(tok.decode(new, skip_special_tokens=True))
    rows = {
        "copy the source (baseline)": [line.replace(" ", "") for line in test],
        f"{args.preset}, {args.steps} steps": restored,
    }
    print(f"{len(train)} training lines, {len(test)} held-out lines from other files\n")
    print("| system | exact match | character BLEU-4 |\n|---|---:|---:|")
    report = {}
    for name, hyps in rows.items():
        exact = sum(h == r for h, r in zip(hyps, test)) / len(test)
        bleu = sum(char_bleu(h, r) for h, r in zip(hyps, test)) / len(test)
        report[name] = {"exact_match": exact, "char_bleu4": bleu}
        print(f"| {name} | {100 * exact:.1f}% | {100 * bleu:.1f} |")
    print("\nexamples:")
    for line, hyp in list(zip(test, restored))[:5]:
        print(f"  {line.replace(' ', '')!r} -> {hyp!r} (target {line!r})")
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
