"""Validated safetensors reading and atomic writing.

The safetensors layout is: 8-byte little-endian header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data.
Before any tensor is touched, `read_header` checks every claim the header makes against the
file itself (sizes, offsets, overlaps, dtype x shape = byte length), so a lying file fails fast
with a `CheckpointError` and nothing of the claimed size is allocated.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from qkv.atomic import atomic_path
from qkv.errors import CheckpointError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Parse and validate a safetensors header; returns {name: {"dtype", "shape", "data_offsets"}}."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes; the header length alone is 8)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: header length {n} is larger than the file ({size} bytes); the file is truncated"
                )
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER}-byte limit")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: entry needs dtype, shape and data_offsets")
        if info["dtype"] not in DTYPE_SIZES:
            raise CheckpointError(f"{where}: unknown dtype {info['dtype']!r}; known: {', '.join(DTYPE_SIZES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} must be [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] lie outside the {data_len} data bytes; the file is "
                "truncated or the header is corrupt"
            )
        expected = math.prod(shape) * DTYPE_SIZES[info["dtype"]]
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: {info['dtype']} x {shape} needs {expected} bytes but data_offsets span {end - begin}"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file (bytes {b1}..{e0})")
    return header


class SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of one validated safetensors file."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self.header = read_header(self.path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as exc:  # the Rust reader's own checks
            raise CheckpointError(f"{self.path}: {exc}") from exc

    def names(self) -> set[str]:
        return set(self.header)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Write tensors atomically (temp file + fsync + rename); shared storage must be deduplicated first."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
