"""Edit a saved qkv checkpoint in place, for the hostile-file tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def edit_config(path: Path, change: Callable[[dict], object]) -> None:
    """Apply `change` to the parsed config.json of the checkpoint at `path` and write it back."""
    data = json.loads((path / "config.json").read_text())
    change(data)
    (path / "config.json").write_text(json.dumps(data))


def edit_weights(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Apply `change` to the tensors of the checkpoint's model.safetensors and write them back."""
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))
