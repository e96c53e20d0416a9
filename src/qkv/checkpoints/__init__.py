"""Reading and writing model files: qkv's native format, Hugging Face directories and GGUF files.

The per-family differences live in data: `keymaps` (tensor names) and `hf_config` (config fields).
"""

from qkv.checkpoints.gguf import load_gguf, read_gguf
from qkv.checkpoints.hf import export_hf, load_hf
from qkv.checkpoints.native import (
    is_native_checkpoint,
    load_native,
    load_training_state,
    read_native_config,
    save_native,
)

__all__ = [
    "export_hf",
    "is_native_checkpoint",
    "load_gguf",
    "load_hf",
    "load_native",
    "load_training_state",
    "read_gguf",
    "read_native_config",
    "save_native",
]
