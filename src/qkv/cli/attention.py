"""`qkv attention MODEL --prompt TEXT --out map.png`: draw the attention weights of every layer/head."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="draw attention maps for a prompt", description=__doc__)
    p.add_argument("model", metavar="MODEL", help="a checkpoint directory or known model name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default="attention.png", help="PNG file to write (default: attention.png)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers to draw (default: all)")
    p.add_argument("--heads", type=int, nargs="*", default=None, help="heads to draw (default: all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.load import load
    from qkv.viz import attention_maps, plot_attention

    model = load(args.model).eval()
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{args.model} carries no tokenizer, so the prompt cannot be encoded")
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    weights = attention_maps(model, torch.tensor([ids]))
    tokens = [tok.decode([i]) for i in ids]
    path = plot_attention(weights, tokens, args.out, layers=args.layers, heads=args.heads, title=args.prompt[:60])
    print(f"attention map ({weights.shape[0]} layers x {weights.shape[1]} heads) written to {path}")
    return 0
