"""Validated safetensors reading and atomic writing.

The safetensors layout is: 8-byte little-endian header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data.
Before any tensor is touched, `read_header` checks every claim the header makes against the
file itself (sizes, offsets, overlaps, dtype x shape = byte length, rank at most `MAX_RANK`, sizes
below 2^63 even next to a zero), so a lying file fails fast with a `CheckpointError` and nothing
of the claimed size is allocated.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from qkv.atomic import atomic_path
from qkv.errors import CheckpointError
from qkv.formats.jsonfile import parse_json

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
MAX_RANK = 8  # real weights have at most 5 dimensions; a bound keeps every shape check cheap
MAX_DIM = 2**63  # PyTorch sizes are signed 64-bit integers


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Parse and validate a safetensors header; returns {name: {"dtype", "shape", "data_offsets"}}.

    Raises CheckpointError naming the file for a header that is not JSON (or nests too deeply), a
    length, offset or shape the file cannot hold, a rank above `MAX_RANK`, an unknown dtype, or
    tensors that overlap. Linear in the header's size; nothing of a claimed size is allocated.
    """
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
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    header = parse_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must be a JSON object of strings (the safetensors format)")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        begin, end = _check_entry(f"{path}: tensor {_brief(name)}", info, data_len)
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file (bytes {b1}..{e0})")
    return header


def _check_entry(where: str, info: object, data_len: int) -> tuple[int, int]:
    """The [begin, end) data span of one header entry, after checking its dtype, shape and span."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{where}: entry needs dtype, shape and data_offsets")
    if info["dtype"] not in DTYPE_SIZES:
        raise CheckpointError(f"{where}: unknown dtype {_brief(info['dtype'])}; known: {', '.join(DTYPE_SIZES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list):
        raise CheckpointError(f"{where}: shape {_brief(shape)} must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise CheckpointError(
            f"{where}: shape has {len(shape)} dimensions; qkv reads tensors of at most {MAX_RANK} "
            "(the header is corrupt)"
        )
    if not all(type(d) is int and 0 <= d < MAX_DIM for d in shape):
        raise CheckpointError(
            f"{where}: shape {shape!r} must be a list of non-negative integers below 2^63 (PyTorch's size limit)"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {_brief(offsets)} must be [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the {data_len} data bytes; the file is "
            "truncated or the header is corrupt"
        )
    expected = _n_bytes(shape, DTYPE_SIZES[info["dtype"]])
    if expected != end - begin:
        raise CheckpointError(
            f"{where}: {info['dtype']} x {shape} needs {expected} bytes but data_offsets span {end - begin}"
        )
    return begin, end


def _brief(value: object, limit: int = 80) -> str:
    """`repr(value)`, cut short: a hostile header can make any field megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _n_bytes(shape: list[int] | tuple[int, ...], item_size: int) -> int:
    """Bytes of a tensor of `shape`. A zero anywhere makes it empty, whatever the other sizes."""
    return 0 if 0 in shape else math.prod(shape) * item_size


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

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} from the validated header; no tensor is read."""
        return {name: tuple(info["shape"]) for name, info in self.header.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Write tensors atomically (temp file + fsync + rename); shared storage must be deduplicated first."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
