"""`qkv zero-shot MODEL IMAGE... --labels "a cat,a dog"`: which caption fits each image (CLIP)."""

from __future__ import annotations

import argparse

from qkv.cli.args import add_model_argument
from qkv.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zero-shot", help="classify images by captions with a CLIP model", description=__doc__)
    add_model_argument(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--labels", required=True, help='comma-separated labels, e.g. "a cat,a dog,a digit"')
    p.add_argument("--template", default="{}", help='caption for a label, e.g. "a photo of {}" (default: the label)')
    p.add_argument("--truncate", action="store_true", help="cut captions longer than the text tower's positions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkv.loading import load
    from qkv.zero_shot import zero_shot

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise UsageError("--labels needs at least two comma-separated labels to choose between")
    model = load(args.model)
    if not hasattr(model, "encode_image"):
        raise UsageError(f"{args.model} is not a CLIP model; zero-shot classification needs one")
    probs = zero_shot(model, list(args.images), labels, args.template, args.truncate)
    for image, row in zip(args.images, probs, strict=True):
        ranked = sorted(zip(labels, row.tolist(), strict=True), key=lambda x: -x[1])
        print(f"{image}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranked))
    return 0
