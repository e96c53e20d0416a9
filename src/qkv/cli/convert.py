"""`qkv convert SRC DST --to hf|qkv [--quantize int4|int8]`: write a model in another format.

SRC is anything `qkv.load` reads: a qkv checkpoint, a Hugging Face directory, a .gguf file, or a
known model name (`qkv models`). Quantized weights (GGUF blocks, a quantized qkv checkpoint) are
dequantized first.

  --to hf    a Hugging Face directory (config.json, model.safetensors in float32, tokenizer.json)
             that transformers.AutoModelForCausalLM.from_pretrained(DST) loads
  --to qkv   qkv's native checkpoint (in --dtype if given, else the source's dtype)
  --quantize int4|int8 (--to qkv only): a quantized qkv checkpoint. Every linear layer is
             rounded from the dense weights to weight-only int4 (groups of 32) or int8 (per
             channel) (`qkv.nn.quant.quantize_model`); the other weights (embeddings, norms) are
             kept in --dtype, bfloat16 by default. `qkv.load(DST)` reads it back quantized.

DST appears complete or not at all. An existing DST is replaced only when it is a checkpoint of
the format being written, or an empty directory; any other directory or file is left alone.

  qkv convert smollm2-135m-instruct smollm2-hf --to hf
  qkv convert runs/tiny-llama/checkpoint tiny-hf --to hf
  qkv convert smollm2-135m-instruct smollm2-int8 --to qkv --quantize int8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qkv.errors import UsageError

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from torch import nn

FORMATS = {"hf": "Hugging Face", "qkv": "qkv"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a model to Hugging Face or qkv format", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("src", metavar="SRC", help="a qkv checkpoint, HF directory, .gguf file or known model name")
    p.add_argument("dst", metavar="DST", help="the directory to write")
    p.add_argument("--to", choices=tuple(FORMATS), required=True, help="the format to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weight dtype (--to qkv; --to hf always writes float32)")  # fmt: skip
    p.add_argument("--quantize", choices=("int4", "int8"), default=None,
                   help="write weight-only quantized linear layers (--to qkv only)")  # fmt: skip
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
    from qkv.nn.quant import QuantLinear

    dst = Path(args.dst)
    if args.to == "hf" and args.dtype not in (None, "float32"):
        raise UsageError(f"--to hf writes float32 weights; drop --dtype {args.dtype} (or use --to qkv)")
    if args.to == "hf" and args.quantize:
        raise UsageError(
            f"--quantize {args.quantize} writes a qkv checkpoint: a Hugging Face directory holds dense weights "
            "(use --to qkv, or drop --quantize)"
        )
    check_destination(dst, args.to, args.src)
    print(f"qkv: loading {args.src} ...", file=sys.stderr)
    model = load(args.src, dtype=None if args.quantize else args.dtype, dequantize=True)
    if args.quantize:
        quantize(model, args.quantize, args.dtype or "bfloat16")
    print(f"qkv: writing a {FORMATS[args.to]} checkpoint to {dst} ...", file=sys.stderr)
    (export_hf if args.to == "hf" else save_native)(model, dst)
    size = sum(f.stat().st_size for f in dst.iterdir() if f.is_file())
    n_params = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)
    )
    print(f"qkv: {n_params / 1e6:.1f}M parameters, {size / 1e6:.1f} MB in {dst}", file=sys.stderr)
    print(dst)
    return 0


def quantize(model: nn.Module, scheme: str, dtype: str) -> None:
    """Quantize `model`'s linear layers to `scheme` in place, from its dense weights, with a line of
    progress per quarter; then cast the rest to `dtype` (a quantized layer's scales stay float32)."""
    from qkv.checkpoints.materialize import resolve_dtype
    from qkv.nn.quant import QUANT_SCHEMES, default_targets, quantize_model, quantized_modules

    targets = default_targets(model)
    step = max(1, len(targets) // 4)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            print(f"qkv: quantizing to {scheme}: {done}/{total} linear layers", file=sys.stderr)

    quantize_model(model, scheme, targets, progress=progress)
    model.to(resolve_dtype(dtype))
    dense = len(targets) - len(quantized_modules(model))
    group = QUANT_SCHEMES[scheme][1]
    if dense == len(targets):
        raise UsageError(
            f"--quantize {scheme}: no linear layer of this model can be quantized (their input sizes are not "
            f"multiples of the group size {group}); use --quantize int8 (per channel)"
        )
    if dense:
        print(f"qkv: {dense} linear layers stay dense (input size not a multiple of {group})", file=sys.stderr)
