"""`qkv convert SRC DST --to hf|qkv`: write a model in another format.

SRC is anything `qkv.load` reads: a qkv checkpoint, a Hugging Face directory, a .gguf file, or a
known model name (`qkv models`). GGUF weights are dequantized.

  --to hf    a Hugging Face directory (config.json, model.safetensors in float32, tokenizer.json)
             that transformers.AutoModelForCausalLM.from_pretrained(DST) loads
  --to qkv   qkv's native checkpoint (in --dtype if given, else the source's dtype)

DST appears complete or not at all. An existing DST is replaced only when it is a checkpoint of
the format being written, or an empty directory; any other directory or file is left alone.

  qkv convert smollm2-135m-instruct smollm2-hf --to hf
  qkv convert runs/tiny-llama/checkpoint tiny-hf --to hf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkv.errors import UsageError

FORMATS = {"hf": "Hugging Face", "qkv": "qkv"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a model to Hugging Face or qkv format", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("src", metavar="SRC", help="a qkv checkpoint, HF directory, .gguf file or known model name")
    p.add_argument("dst", metavar="DST", help="the directory to write")
    p.add_argument("--to", choices=tuple(FORMATS), required=True, help="the format to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weight dtype (--to qkv; --to hf always writes float32)")  # fmt: skip
    p.set_defaults(func=run)


def check_destination(dst: Path, fmt: str, src: str) -> None:
    """Fail before loading anything unless writing a `fmt` checkpoint at `dst` is allowed."""
    from qkv.atomic import check_replaceable
    from qkv.checkpoints.hf import is_hf_dir
    from qkv.checkpoints.native import is_native_checkpoint

    if Path(src).exists() and Path(src).resolve() == dst.resolve():
        raise UsageError(f"DST {dst} is the source itself; write the conversion to another directory")
    is_kind = {"hf": is_hf_dir, "qkv": is_native_checkpoint}[fmt]
    check_replaceable(dst, is_kind, f"{FORMATS[fmt]} checkpoint")


def run(args: argparse.Namespace) -> int:
    from qkv.checkpoints.hf import export_hf
    from qkv.checkpoints.native import save_native
    from qkv.loading import load

    dst = Path(args.dst)
    if args.to == "hf" and args.dtype not in (None, "float32"):
        raise UsageError(f"--to hf writes float32 weights; drop --dtype {args.dtype} (or use --to qkv)")
    check_destination(dst, args.to, args.src)
    print(f"qkv: loading {args.src} ...", file=sys.stderr)
    model = load(args.src, dtype=args.dtype)
    print(f"qkv: writing a {FORMATS[args.to]} checkpoint to {dst} ...", file=sys.stderr)
    (export_hf if args.to == "hf" else save_native)(model, dst)
    size = sum(f.stat().st_size for f in dst.iterdir() if f.is_file())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"qkv: {n_params / 1e6:.1f}M parameters, {size / 1e6:.1f} MB in {dst}", file=sys.stderr)
    print(dst)
    return 0
