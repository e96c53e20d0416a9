"""Malformed GGUF files: each is a CheckpointError naming the file and the problem.

A valid one-layer file is written with `gguf.GGUFWriter`, then corrupted byte by byte (or written
without a key or tensor). Every rejection must come fast (well under a second), without
allocating the sizes the file lies about, and without changing anything on disk.
"""

from __future__ import annotations

import re
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qkv import CheckpointError
from qkv.checkpoints.gguf import load_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

HUGE = 2**63
_HPARAMS = {
    "context_length": 64, "embedding_length": 32, "block_count": 1, "feed_forward_length": 64,
    "attention.head_count": 2, "attention.head_count_kv": 1, "attention.layer_norm_rms_epsilon": 1e-5,
    "rope.freq_base": 10000.0, "vocab_size": 16,
}  # fmt: skip
_TENSORS = {
    "token_embd.weight": (16, 32), "output_norm.weight": (32,), "output.weight": (16, 32),
    "blk.0.attn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32),
    "blk.0.attn_v.weight": (16, 32), "blk.0.attn_output.weight": (32, 32), "blk.0.ffn_norm.weight": (32,),
    "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64),
}  # fmt: skip


def write_valid(path: Path, drop: tuple[str, ...] = (), hparams: dict | None = None, tensors: dict | None = None,
                alignment: int | None = None) -> Path:  # fmt: skip
    """A small, valid llama GGUF (token_embd in Q8_0, the rest F32), minus the keys/tensors in `drop`."""
    w = gguf.GGUFWriter(path, "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_string("general.name", "tiny")
    w.add_array("general.tags", ["a", "b"])
    for key, value in {**_HPARAMS, **(hparams or {})}.items():
        if f"llama.{key}" not in drop:
            adders = {float: w.add_float32, str: w.add_string, int: w.add_uint32}
            adders[type(value)](f"llama.{key}", value)
    rng = np.random.default_rng(0)
    for name, shape in {**_TENSORS, **(tensors or {})}.items():
        if name not in drop:
            data = rng.standard_normal(shape).astype(np.float32) * 0.1
            qtype = Q.Q8_0 if name == "token_embd.weight" else Q.F32
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensor_record(data: bytearray, name: str) -> int:
    """Byte position just after `name` in the tensor table (where n_dims starts)."""
    encoded = name.encode()
    at = data.find(struct.pack("<Q", len(encoded)) + encoded)  # metadata never holds tensor names
    assert at > 0, name
    return at + 8 + len(encoded)


def _set(fmt: str, pos: Callable[[bytearray], int], value) -> Callable[[bytearray], None]:
    def corrupt(data: bytearray) -> None:
        struct.pack_into(fmt, data, pos(data), value)

    return corrupt


def _tensor_field(name: str, field: str, n_dims: int = 2) -> Callable[[bytearray], int]:
    """Position of `field` (n_dims, dim0, dim1, type, offset) in `name`'s tensor record."""
    offsets = {"n_dims": 0, "dim0": 4, "dim1": 12, "type": 4 + 8 * n_dims, "offset": 8 + 8 * n_dims}
    return lambda data: _tensor_record(data, name) + offsets[field]


def _offset_of(data: bytearray, name: str, n_dims: int = 2) -> int:
    return struct.unpack_from("<Q", data, _tensor_record(data, name) + 8 + 8 * n_dims)[0]


def _out(field: str) -> Callable[[bytearray], int]:
    return _tensor_field("output.weight", field)


def _overlap(data: bytearray) -> None:
    struct.pack_into("<Q", data, _out("offset")(data), _offset_of(data, "blk.0.attn_q.weight"))


def _rename(old: bytes, new: bytes) -> Callable[[bytearray], None]:
    def corrupt(data: bytearray) -> None:
        at = data.find(old)
        data[at : at + len(old)] = new

    return corrupt


def _truncate(n: int | Callable[[bytearray], int]) -> Callable[[bytearray], None]:
    def corrupt(data: bytearray) -> None:
        del data[n(data) if callable(n) else n :]

    return corrupt


def _key_pos(key: bytes, after: int = 0) -> Callable[[bytearray], int]:
    """Position `after` bytes past the end of metadata key `key`."""
    return lambda data: data.find(key) + len(key) + after


# (id, corruption of the valid file's bytes, what the message must say)
CORRUPTIONS = [
    ("empty", _truncate(0), r"is empty"),
    ("magic-only", _truncate(3), r"truncated: 3 bytes"),
    ("bad-magic", _set("<4s", lambda d: 0, b"GGML"), r"not a GGUF file: it starts with b'GGML'"),
    ("version-99", _set("<I", lambda d: 4, 99), r"GGUF version 99; qkv reads versions 2, 3"),
    ("version-1", _set("<I", lambda d: 4, 1), r"GGUF version 1;"),
    ("big-endian", _set(">I", lambda d: 4, 3), r"big-endian"),
    ("tensor-count-2^63", _set("<Q", lambda d: 8, HUGE), rf"claims {HUGE} tensors"),
    ("tensor-count-too-many", _set("<Q", lambda d: 8, 100_000), r"claims 100000 tensors"),
    # The 13th record is read from the alignment padding and tensor data that follow the table.
    ("tensor-count-plus-one", _set("<Q", lambda d: 8, len(_TENSORS) + 1),
     r"tensor '' at byte \d+ has \d+ dimensions; GGUF allows 1 to 4"),
    ("kv-count-2^63", _set("<Q", lambda d: 16, HUGE), rf"{HUGE} metadata entries"),
    ("key-length-2^63", _set("<Q", lambda d: 24, HUGE), rf"length of metadata key {HUGE} at byte 24 cannot fit"),
    ("value-length-2^63", _set("<Q", _key_pos(b"general.name", 4), HUGE), rf"length of value of 'general.name' {HUGE}"),
    ("array-length-2^63", _set("<Q", _key_pos(b"general.tags", 8), HUGE), rf"array length of 'general.tags' {HUGE}"),
    ("unknown-value-type", _set("<I", _key_pos(b"general.name"), 99), r"'general.name' has unknown value type 99"),
    ("key-not-utf8", _set("<B", _key_pos(b"general.name", -1), 0xFF), r"metadata key at byte \d+ is not valid UTF-8"),
    ("truncated-in-metadata", _truncate(60), r"more than the 36 bytes after the header can hold \(the file is trunc"),
    ("truncated-in-tensor-table", _truncate(lambda d: d.find(b"blk.0.ffn_down.weight") + 5),
     r"length of tensor name \d+ at byte \d+ cannot fit|needs \d+ bytes but only \d+ remain"),
    ("truncated-in-data", _truncate(lambda d: len(d) - 100), r"needs bytes \[\d+, \d+\) but the file ends at"),
    ("offset-past-eof", _set("<Q", _out("offset"), 2**40), r"tensor output\.weight .* file ends"),
    ("offset-2^63", _set("<Q", _out("offset"), HUGE), r"tensor output\.weight .* file ends"),
    ("offset-misaligned", _set("<Q", _out("offset"), 33), r"not a multiple of the alignment"),
    ("dims-past-eof", _set("<Q", _out("dim1"), 2**40), r"tensor output\.weight .* file ends"),
    ("dims-2^63", _set("<Q", _out("dim1"), HUGE), rf"'output\.weight' at byte \d+ has dimensions \[32, {HUGE}\]"),
    ("n-dims-5", _set("<I", _out("n_dims"), 5), r"has 5 dimensions; GGUF allows 1 to 4"),
    ("overlapping-tensors", _overlap, r"overlaps tensor"),
    ("unknown-tensor-type", _set("<I", _out("type"), 99), r"output\.weight has unknown type id 99"),
    ("row-not-whole-blocks", _set("<I", _out("type"), int(Q.Q2_K)),
     r"output\.weight: row length 32 is not a multiple of the Q2_K block 256"),
    ("undequantizable-type", _set("<I", _out("type"), int(Q.I8)),
     r"output\.weight is stored as I8, which qkv cannot dequantize"),
    ("duplicate-tensor", _rename(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight"), r"attn_q\.weight appears twice"),
    ("duplicate-key", _rename(b"general.tags", b"general.name"), r"'general.name' appears twice"),
    ("no-architecture", _rename(b"general.architecture", b"general.architecturX"), r"'general.architecture'"),
    ("unsupported-architecture", _rename(b"llama", b"llamo"), r"architecture 'llamo' is not supported"),
]  # fmt: skip


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def assert_rejected(path: Path, pattern: str) -> CheckpointError:
    """load_gguf(path) raises a CheckpointError naming the file and matching `pattern`, fast,
    with little memory, and leaves the folder as it was."""
    before = _snapshot(path.parent)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as info:
            load_gguf(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(path) in message, message
    assert re.search(pattern, message), message
    assert elapsed < 1.0, (elapsed, message)
    assert peak < 32 * 2**20, (peak, message)
    assert _snapshot(path.parent) == before
    return info.value


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory) -> bytes:
    """The valid file's bytes; loading it once also warms up torch (meta device, imports)."""
    path = write_valid(tmp_path_factory.mktemp("gguf") / "valid.gguf")
    model = load_gguf(path)
    assert model.config.n_layers == 1 and model.config.tie_embeddings is False
    return path.read_bytes()


def test_valid_file_with_custom_alignment_loads(tmp_path, valid_bytes):
    model = load_gguf(write_valid(tmp_path / "aligned.gguf", alignment=64))
    assert model.config.d_model == 32


@pytest.mark.parametrize("corrupt, pattern", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_file_is_rejected(tmp_path, valid_bytes, corrupt, pattern):
    data = bytearray(valid_bytes)
    corrupt(data)
    assert bytes(data) != valid_bytes
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    assert_rejected(path, pattern)


@pytest.mark.parametrize(
    "drop, pattern",
    [
        (("llama.block_count",), r"missing required metadata key 'llama\.block_count'"),
        (("llama.embedding_length",), r"missing required metadata key 'llama\.embedding_length'"),
        (("llama.attention.layer_norm_rms_epsilon",), r"'llama\.attention\.layer_norm_rms_epsilon'"),
        (("blk.0.ffn_down.weight",), r"missing tensor\(s\) blk\.0\.ffn_down\.weight"),
        (("token_embd.weight", "blk.0.attn_v.weight"), r"missing tensor\(s\) .*\(2 in all\)"),
    ],
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else "",
)
def test_missing_metadata_or_tensors(tmp_path, valid_bytes, drop, pattern):
    assert_rejected(write_valid(tmp_path / "incomplete.gguf", drop=drop), pattern)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(hparams={"block_count": "one"}), r"llama\.block_count='one' should be an integer"),
        (dict(hparams={"feed_forward_length": 48}), r"blk\.0\.ffn_gate\.weight \+ blk\.0\.ffn_up\.weight has shape"),
        (dict(hparams={"attention.head_count": 3}), r"d_model=32 is not divisible by n_heads=3"),
        (dict(hparams={"rope.dimension_count": 8}), r"rope\.dimension_count=8 differs from the head size 16"),
        (dict(tensors={"blk.0.attn_extra.weight": (4, 32)}), r"unexpected tensor\(s\) blk\.0\.attn_extra\.weight"),
        (dict(tensors={"rope_freqs.weight": (8,)}), r"rope_freqs\.weight holds RoPE frequency factors"),
    ],
    ids=["hparam-type", "shape-mismatch", "bad-head-count", "partial-rope", "unexpected-tensor", "rope-freqs"],
)
def test_inconsistent_file_is_rejected(tmp_path, valid_bytes, change, pattern):
    assert_rejected(write_valid(tmp_path / "inconsistent.gguf", **change), pattern)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")
