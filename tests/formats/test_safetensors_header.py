"""`read_header`: what a safetensors header may claim, checked against the file before any tensor is read."""

from __future__ import annotations

import json
import struct
import time

import pytest

from qkv.errors import CheckpointError
from qkv.formats.safetensors import MAX_RANK, SafetensorsFile, read_header


def write(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_shapes_of_every_rank_up_to_the_bound_and_empty_tensors_are_read(tmp_path):
    header = {
        "scalar": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        "rank_8": {"dtype": "U8", "shape": [1] * MAX_RANK, "data_offsets": [4, 5]},
        "empty": {"dtype": "F32", "shape": [0, 4096], "data_offsets": [5, 5]},
        "__metadata__": {"format": "pt"},
    }
    file = SafetensorsFile(write(tmp_path / "ok.safetensors", header, b"\0" * 5))
    assert file.shapes() == {"scalar": (), "rank_8": (1,) * MAX_RANK, "empty": (0, 4096)}
    assert file["empty"].shape == (0, 4096)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"shape": [2] * 10**6}, r"shape has 1000000 dimensions; qkv reads tensors of at most 8"),
        ({"shape": [1] * (MAX_RANK + 1)}, r"shape has 9 dimensions"),
        ({"shape": [0, 2**63], "data_offsets": [0, 0]}, r"shape \[0, 9223372036854775808\] must be .* below 2\^63"),
        ({"shape": [2**62, 2**62]}, r"F32 x \[4611686018427387904, 4611686018427387904\] needs \d+ bytes but"),
        ({"shape": [True]}, r"shape \[True\] must be a list of non-negative integers"),
        ({"shape": [-1]}, r"shape \[-1\] must be"),
        ({"dtype": "x" * 10**6}, r"unknown dtype 'xxx.*\.\.\. \(1000002 characters\)"),
    ],
    ids=["rank-10^6", "rank-9", "zero-and-2^63", "product-2^124", "bool", "negative", "long-dtype"],
)
def test_impossible_shapes_fail_fast(tmp_path, entry, message):
    path = write(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], **entry}},
                 b"\0" * 4)  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as info:
        read_header(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(info.value) and len(str(info.value)) < 500


@pytest.mark.parametrize("metadata", [[1, 2], {"format": 1}], ids=["list", "not-strings"])
def test_metadata_must_be_strings(tmp_path, metadata):
    path = write(tmp_path / "bad.safetensors", {"__metadata__": metadata})
    with pytest.raises(CheckpointError, match=r"__metadata__ must be a JSON object of strings"):
        read_header(path)


def test_deeply_nested_header(tmp_path):
    raw = b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match=r"safetensors header nests JSON arrays or objects too deeply"):
        read_header(path)
