"""`qkv generate MODEL --prompt TEXT`: continue a prompt with a trained or loaded model."""

from __future__ import annotations

import argparse
import sys

from qkv.cli.args import add_model_argument, non_negative_float, non_negative_int, positive_int, probability


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt", description=__doc__)
    add_model_argument(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", "-n", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, default=None)
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkv.load import load

    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = args.prompt
    model = load(args.model).eval()
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{args.model} carries no tokenizer, so a text prompt cannot be encoded")
    import torch

    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )  # fmt: skip
    sys.stdout.write(prompt + tok.decode(out[0, len(ids) :].tolist()) + "\n")
    return 0
