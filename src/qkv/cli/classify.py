"""`qkv classify MODEL "text" ...`: the label a fine-tuned classifier gives each text, with its probability.

MODEL is a checkpoint `qkv finetune` wrote (or any encoder with a classification head). One line
per text: LABEL<TAB>PROBABILITY (--top-k K: the K most likely labels, best first). "-" reads the
texts from standard input, one per line. --json prints one JSON object per text instead. For an
image classifier (a ViT, e.g. from `qkv train --task image-classification`), the arguments are
image files, read with the model's own preprocessing.
"""

from __future__ import annotations

import argparse
import json
import sys

from qkv.cli.args import add_model_argument, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier", description=__doc__)
    add_model_argument(p)
    p.add_argument("texts", nargs="+", metavar="TEXT", help='texts to classify ("-": one per line from stdin)')
    p.add_argument("--top-k", type=positive_int, default=1, help="labels shown per text (default: 1)")
    p.add_argument("--max-len", type=positive_int, default=None, help="tokens per text (default: the model's context)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkv.loading import load
    from qkv.training.classification import label_names_of, predict

    texts = [line for line in sys.stdin.read().splitlines() if line.strip()] if args.texts == ["-"] else args.texts
    model = load(args.model)
    names = label_names_of(model)
    if model.config.family == "vit":
        import torch

        from qkv.image import preprocess

        with torch.no_grad():
            pixels = preprocess(texts, model.preprocessing, model.config.n_channels)
            probs = model(pixels).logits.softmax(dim=-1)
    else:
        probs = predict(model, texts, max_len=args.max_len)
    for text, row in zip(texts, probs):
        top = row.topk(min(args.top_k, len(names)))
        ranked = [(names[i], float(p)) for p, i in zip(top.values, top.indices)]
        if args.json:
            print(json.dumps({"text": text, "label": ranked[0][0], "probability": ranked[0][1],
                              "top": [{"label": n, "probability": p} for n, p in ranked]}))  # fmt: skip
        else:
            print("\n".join(f"{n}\t{p:.4f}" for n, p in ranked))
    return 0
