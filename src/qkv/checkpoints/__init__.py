"""Reading and writing model files: qkv's native directory format (HF and GGUF readers come later)."""

from qkv.checkpoints.native import (
    is_native_checkpoint,
    load_native,
    load_training_state,
    read_native_config,
    save_native,
)

__all__ = ["is_native_checkpoint", "load_native", "load_training_state", "read_native_config", "save_native"]
