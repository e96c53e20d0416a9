"""`qkv lora merge --base MODEL --adapter DIR --out DIR`: fold a LoRA adapter into its base model.

MODEL is anything `qkv.load` reads (a qkv checkpoint, a Hugging Face directory, a .gguf file, a
known model name); DIR is a PEFT-format adapter directory (adapter_config.json +
adapter_model.safetensors), written by qkv (`qkv.nn.lora.save_adapter`) or by the `peft` package.
The merged weights W + (alpha / r) B A go to a plain checkpoint that loads without any LoRA code:

  --to qkv   qkv's native checkpoint (the default). Layers of a quantized base (a GGUF's packed
             int4/int8) that the adapter covers become dense; the others stay packed.
  --to hf    a Hugging Face directory (float32; a quantized base is dequantized first).

OUT appears complete or not at all, and only an existing checkpoint of the same format (or an empty
directory) is replaced.

  qkv lora merge --base smollm2-135m-instruct --adapter runs/sft/adapter --out runs/sft/merged
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkv.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="LoRA adapters: merge one into its base model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    merge = actions.add_parser("merge", help="write base + adapter as a plain checkpoint", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    merge.add_argument("--base", required=True, metavar="MODEL", help="the base model the adapter was trained on")
    merge.add_argument("--adapter", required=True, metavar="DIR", help="a PEFT-format LoRA adapter directory")
    merge.add_argument("--out", required=True, metavar="DIR", help="the merged checkpoint to write")
    merge.add_argument("--to", choices=("qkv", "hf"), default="qkv", help="the checkpoint format (default: qkv)")
    merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="weight dtype of a qkv checkpoint (default: the base's)")  # fmt: skip
    merge.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from qkv.checkpoints.hf import export_hf
    from qkv.checkpoints.native import save_native
    from qkv.checkpoints.peft import read_adapter_config
    from qkv.cli.convert import check_destination
    from qkv.loading import load
    from qkv.nn.lora import load_adapter, merge_lora
    from qkv.nn.quant import QuantLinear

    out, adapter = Path(args.out), Path(args.adapter)
    if args.to == "hf" and args.dtype not in (None, "float32"):
        raise UsageError(f"--to hf writes float32 weights; drop --dtype {args.dtype} (or use --to qkv)")
    if adapter.exists() and out.resolve() == adapter.resolve():
        raise UsageError(f"--out {out} is the adapter itself; write the merged model to another directory")
    check_destination(out, args.to, args.base)
    config = read_adapter_config(adapter)  # a bad adapter fails before the base is loaded
    print(f"qkv: loading {args.base} ...", file=sys.stderr)
    model = load(args.base, dtype=args.dtype, dequantize=args.to == "hf")
    parts = load_adapter(model, adapter)
    print(f"qkv: adapter r={config.rank} alpha={config.alpha:g} on {len(parts)} projections", file=sys.stderr)
    packed = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    merge_lora(model)
    densified = packed - {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if densified:
        print(f"qkv: {len(densified)} quantized layers the adapter covers are dense after merging", file=sys.stderr)
    (export_hf if args.to == "hf" else save_native)(model, out)
    print(out)
    return 0
