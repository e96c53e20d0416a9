"""The vision report: ViT and CLIP trained on scikit-learn's handwritten digits, scored on a
held-out fifth. Prints the numbers README quotes and writes the confusion matrix PNG.

    python benchmarks/vision_digits.py [--vit-steps 1500] [--clip-steps 800] [--tasks clip] [--out DIR]

Same as `qkv train --task image-classification --data digits` and `--task clip`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qkv.training.vision import train_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit-steps", type=int, default=1500)
    parser.add_argument("--clip-steps", type=int, default=800)
    parser.add_argument("--out", default="runs/vision-digits")
    parser.add_argument("--tasks", nargs="+", default=["image-classification", "clip"], help="which to run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps_of = {"image-classification": args.vit_steps, "clip": args.clip_steps}
    for task in args.tasks:
        steps = steps_of[task]
        out = Path(args.out) / task
        _, metrics = train_digits(task, steps, out_dir=str(out), progress=True)
        metrics.pop("confusion", None)
        print(json.dumps(metrics))


if __name__ == "__main__":
    main()
