"""Reading GGUF files (llama.cpp's model format) without trusting them.

A GGUF file is a header (magic ``GGUF``, version, tensor count, metadata count), typed key/value
metadata, one info record per tensor (name, dims, type, offset), then the aligned tensor data
(spec: ggml `docs/gguf.md`). Every count and length in the header is checked against the bytes
that remain before anything is allocated or looped over, so a corrupt or hostile file is a
`CheckpointError` naming the file and the problem, never a huge allocation or a crash deep inside
a library. The file is memory-mapped read-only; tensor bytes are read only when asked for.

    f = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    f.metadata["llama.block_count"]          # 30
    f.tensors["blk.0.attn_q.weight"].shape   # (576, 576), PyTorch order
    f.tensor("blk.0.attn_q.weight")          # float32 torch tensor of that shape
    f.tensor("blk.0.attn_q.weight", out=w)   # dequantized straight into `w` (a slice or view)

The common tensor types (F32, F16, BF16, Q8_0, Q4_0, Q4_1) are dequantized by vectorised torch
code, bit for bit as `gguf.quants.dequantize` does (tests/formats/test_gguf_reader.py); the
others go through `gguf.quants`' numpy reference.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize as gguf_dequantize

from qkv.errors import CheckpointError

_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; v2 and v3 share the little-endian layout
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 2**63  # llama.cpp reads sizes as int64 (`gguf_init_from_file`), as PyTorch does
_MAX_NESTING = 4  # arrays of arrays of ...: deeper is not a real file, and would recurse unboundedly

_T = GGUFValueType
_SCALARS: dict[GGUFValueType, str] = {
    _T.UINT8: "<B", _T.INT8: "<b", _T.UINT16: "<H", _T.INT16: "<h", _T.UINT32: "<I", _T.INT32: "<i",
    _T.UINT64: "<Q", _T.INT64: "<q", _T.FLOAT32: "<f", _T.FLOAT64: "<d", _T.BOOL: "<?",
}  # fmt: skip
# Smallest encoding of one value of each type: a count of N items needs at least N times this.
_MIN_SIZE = {**{t: struct.calcsize(f) for t, f in _SCALARS.items()}, _T.STRING: 8, _T.ARRAY: 4 + 8}
_U64 = struct.Struct("<Q")
_TENSOR_INFO_MIN_SIZE = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_KV_MIN_SIZE = 8 + 4 + 1  # key length, value type, smallest value

# Tensor types qkv dequantizes (each covered by tests/checkpoints/test_gguf.py). `gguf.quants`
# knows more (IQ*, TQ*, MXFP4); add them here with a test.
Q = GGMLQuantizationType
DEQUANTIZABLE = frozenset(
    (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
)


# Block layouts from ggml (`ggml-common.h`: block_q8_0, block_q4_0, block_q4_1): an fp16 scale d
# (and minimum m), then the quants; a Q4 byte holds element j in its low nibble and element j + 16
# in its high one. Each kernel reads `blocks` [..., type_size] (uint8) and writes `out`
# [..., block_size] (float32, any strides) with gguf.quants' own arithmetic, in float32, one
# operation at a time (no fused multiply-add), so the values are identical to its numpy code.
def _scale(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[..., at : at + 2].view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Packed bytes [..., 16] -> uint8 [..., 32]: every low nibble, then every high nibble.

    Works on the widest words (4, 2 or 1 bytes) the bytes' alignment allows: fewer, wider operations.
    """
    offsets = (qs.storage_offset(), *qs.stride()[:-1])
    words = next(w for w in (torch.int32, torch.int16, torch.uint8) if all(n % w.itemsize == 0 for n in offsets))
    mask = int.from_bytes(b"\x0f" * words.itemsize, "little")
    packed = qs.view(words)
    out = torch.empty(*packed.shape[:-1], 2, packed.shape[-1], dtype=words)
    torch.bitwise_and(packed, mask, out=out[..., 0, :])
    torch.bitwise_and(packed >> 4, mask, out=out[..., 1, :])  # masked: an arithmetic shift is fine
    return out.view(torch.uint8).flatten(-2)


def _copy(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    return lambda blocks, out: out.copy_(blocks.view(dtype))


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks[..., 2:].view(torch.int8)).mul_(_scale(blocks, 0))


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(blocks[..., 2:]).view(torch.int8) - 8).mul_(_scale(blocks, 0))


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(blocks[..., 4:])).mul_(_scale(blocks, 0)).add_(_scale(blocks, 2))


TORCH_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    Q.F32: _copy(torch.float32), Q.F16: _copy(torch.float16), Q.BF16: _copy(torch.bfloat16),
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1,
}  # fmt: skip


# Types whose blocks carry over to `qkv.nn.quant.QuantLinear` as they are (`GGUFFile.quantized`):
# Q4_0 and Q4_1 as int4 in groups of 32, Q8_0 as group-wise int8.
PACKED_BITS: dict[GGMLQuantizationType, int] = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}
PACKED_GROUP = 32
# Work done a piece at a time, so that the temporaries stay in the cache: bytes of the file's blocks
# (`quantized`), float32 values (`tensor` into another dtype).
_CHUNK_BYTES = 1 << 19
_SLAB_ELEMENTS = 1 << 18


def _repack_q4(blocks: torch.Tensor, quants_at: int, out: torch.Tensor) -> None:
    """Q4 blocks [..., type_size] (contiguous) whose 16 bytes of quants start at `quants_at`, element
    j in the low nibble of byte j and j + 16 in its high one -> `out` [..., 16] uint8 holding two
    columns a byte in order: 2k in the low nibble, 2k + 1 in the high one.

    Read as little-endian 16-bit words, bytes 2k and 2k + 1 hold elements 2k and 2k + 1 in their low
    nibbles and 2k + 16 and 2k + 17 in their high ones: each word makes output bytes k and k + 8.
    The words of whole blocks (scales too) are worked on as one contiguous run, and the quants'
    words picked out at the end: short strided rows of 8 would cost more than the scales' words."""
    words = blocks.view(torch.int16)  # [..., type_size / 2]
    for half, shifted in ((out[..., :8], words), (out[..., 8:], words >> 4)):  # arithmetic shift: masked
        nibbles = shifted & 0x0F0F  # the word's two nibbles, one in each byte
        nibbles |= nibbles >> 4
        half.copy_(nibbles[..., quants_at // 2 :])  # int16 -> uint8 keeps the low byte: both nibbles


def _stored_q4_0(blocks: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    _repack_q4(blocks, 2, out["qweight"])
    out["scales"].copy_(_scale(blocks, 0)[..., 0])  # w = (q - 8) d: zero = 0
    out["zeros"].zero_()


def _stored_q4_1(blocks: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    _repack_q4(blocks, 4, out["qweight"])
    d, m = _scale(blocks, 0)[..., 0], _scale(blocks, 2)[..., 0]  # w = q d + m = (q - 8) d + (m + 8 d)
    out["scales"].copy_(d)
    torch.add(m, 8 * d, out=out["zeros"])


def _stored_q8_0(blocks: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    out["qweight"].copy_(blocks[..., 2:].view(torch.int8))
    out["scales"].copy_(_scale(blocks, 0)[..., 0])


STORED_KERNELS = {Q.Q4_0: _stored_q4_0, Q.Q4_1: _stored_q4_1, Q.Q8_0: _stored_q8_0}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a GGUF file. `shape` is in PyTorch order (GGUF lists ne[0] first)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass
class GGUFFile:
    """A validated GGUF file: its metadata, its tensor table, and lazy access to tensor data."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    _data: np.ndarray = field(repr=False)
    _bytes: torch.Tensor | None = field(default=None, repr=False)
    _map: mmap.mmap | None = field(default=None, repr=False)  # what `_data` views

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` (a read-only uint8 view of the file), one row per row."""
        info = self.tensors[name]
        data = self._data[info.offset : info.offset + info.n_bytes]
        rows = math.prod(info.shape[:-1])
        return data.reshape(rows, -1) if rows else data

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as a writable float32 numpy array of shape `tensors[name].shape`."""
        return self.tensor(name).numpy()

    def tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` dequantized into `out`, or into a new float32 tensor of its shape.

        out: any floating tensor or view with the tensor's number of elements, filled in the
        file's row-major element order, e.g. a slice of a fused weight or a permuted view of one
        (the loader writes Q and K rows through the inverse of llama.cpp's RoPE permutation).
        """
        info = self.tensors[name]
        if info.qtype not in DEQUANTIZABLE:
            supported = ", ".join(sorted(t.name for t in DEQUANTIZABLE))
            raise CheckpointError(
                f"{self.path}: tensor {name} is stored as {info.qtype.name}, which qkv cannot dequantize "
                f"(supported: {supported}); re-quantize the model to one of those types"
            )
        if out is None:
            out = torch.empty(info.shape, dtype=torch.float32)
        if out.numel() != math.prod(info.shape):
            raise ValueError(f"{name} has shape {info.shape}; cannot dequantize it into a tensor of shape {out.shape}")
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        kernel = TORCH_KERNELS.get(info.qtype)
        if kernel is None or info.offset % 4:  # a file aligned to less than 4 bytes: numpy reads it
            values = np.require(gguf_dequantize(self.raw(name), info.qtype), np.float32, "W")  # F32: the map
            return out.copy_(torch.from_numpy(values).view(out.shape))
        if out.dtype != torch.float32 and out.dim() == 2 and out.shape == info.shape and out.shape[-1] % block == 0:
            # compute in float32 a slab of rows at a time, then cast: no whole float32 copy at once, and
            # a slab small enough to stay in the cache (SmolLM2's Q8_0 embeddings: 4x faster than 16 MB)
            n_blocks, step = out.shape[-1] // block, max(1, _SLAB_ELEMENTS // out.shape[-1])
            blocks = self._blocks(info).view(out.shape[0], n_blocks, type_size)
            for i in range(0, out.shape[0], step):
                slab = torch.empty(blocks[i : i + step].shape[0], n_blocks, block)
                kernel(blocks[i : i + step], slab)
                out[i : i + step].copy_(slab.view(-1, out.shape[-1]))
            return out
        if out.dtype != torch.float32 or out.shape[-1] % block:  # compute in float32, then cast/reshape
            return out.copy_(self.tensor(name).view(out.shape))
        lead, n_blocks = out.shape[:-1], out.shape[-1] // block
        kernel(self._blocks(info).view(*lead, n_blocks, type_size), out.unflatten(-1, (n_blocks, block)))
        return out

    def _blocks(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's bytes as a flat read-only uint8 tensor over the map (no copy)."""
        if self._bytes is None:
            with warnings.catch_warnings():  # the map is read-only; qkv never writes to it
                warnings.simplefilter("ignore", UserWarning)
                self._bytes = torch.from_numpy(self._data)
        return self._bytes[info.offset : info.offset + info.n_bytes]

    def row_addresses(self, name: str) -> torch.Tensor:
        """The memory address of each row of tensor `name`'s blocks in the map (int64 [rows]), for
        native code that reads the file in place (`qkv/kernels/gguf_int4.c`); valid while the file
        is open. The reader has checked that every row lies inside the file."""
        info = self.tensors[name]
        rows = math.prod(info.shape[:-1])
        start = self._data.ctypes.data + info.offset
        return torch.arange(rows, dtype=torch.int64).mul_(info.n_bytes // max(rows, 1)).add_(start)

    def release(self, name: str) -> None:
        """Let the OS drop tensor `name`'s pages of the map from memory (read back if used again):
        a loader that has copied a tensor out does not keep the file resident beside the model."""
        info, mapped = self.tensors[name], self._map
        if mapped is None or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(info.offset + info.n_bytes, len(mapped))
        if end > start:
            mapped.madvise(mmap.MADV_DONTNEED, start, end - start)

    def quantized(self, name: str, out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Tensor `name` (Q4_0, Q4_1 or Q8_0, see PACKED_BITS) in its own quantized form, rows first:
        {"qweight": uint8 [rows, K / 2] (Q4: two values in [0, 15] a byte, column 2j in the low
        nibble and 2j + 1 in the high one) or int8 [rows, K] (Q8_0), "scales": float32 [rows, K / 32],
        "zeros": float32 [rows, K / 32] (Q4 only)} with w = (q - 8) * scale + zero (Q4) or
        q * scale (Q8_0), `qkv.nn.quant`'s convention: the file's values and fp16 scales, exactly.

        out: those tensors to write into instead of new ones; any views whose leading dimensions
        hold the rows in the file's order (a slice of a fused tensor, or a RoPE-permuted view of
        one, as `tensor(out=...)` takes), the last one contiguous.
        """
        info = self.tensors[name]
        if info.qtype not in STORED_KERNELS:
            raise ValueError(f"{name} is stored as {info.qtype.name}; only {sorted(t.name for t in STORED_KERNELS)} "
                             "keep their quantized form")  # fmt: skip
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        rows, K = math.prod(info.shape[:-1]), info.shape[-1]
        n_blocks, four_bit = K // block, info.qtype != Q.Q8_0
        widths = {
            "qweight": (K // 2, torch.uint8) if four_bit else (K, torch.int8),
            "scales": (n_blocks, torch.float32),
        }
        if four_bit:
            widths["zeros"] = (n_blocks, torch.float32)
        if out is None:
            out = {key: torch.empty(rows, width, dtype=dtype) for key, (width, dtype) in widths.items()}
        lead = tuple(out["qweight"].shape[:-1]) if "qweight" in out else ()
        for key, (width, dtype) in widths.items():
            tensor = out.get(key)
            if not lead or math.prod(lead) != rows or tensor is None or tensor.shape != (*lead, width) \
                    or tensor.dtype != dtype:  # fmt: skip
                got = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
                raise ValueError(f"{name}: out[{key!r}] should be {dtype} with {rows} rows of {width}; got {got}")
        if info.offset % 4:  # the vectorised kernels read aligned words; a misaligned file gets a copy
            blocks = torch.from_numpy(self.raw(name).copy()).view(-1)
        else:
            blocks = self._blocks(info)
        inner = math.prod(lead[1:])  # file rows per index of out's first dimension
        blocks = blocks.view(lead[0], *lead[1:], n_blocks, type_size)
        step = max(1, _CHUNK_BYTES // max(inner * n_blocks * type_size, 1))
        for i in range(0, lead[0], step):
            chunk = {key: tensor[i : i + step] for key, tensor in out.items()}
            chunk["qweight"] = chunk["qweight"].unflatten(-1, (n_blocks, -1))  # [..., blocks, values]
            STORED_KERNELS[info.qtype](blocks[i : i + step], chunk)
        return dict(out)


class _Cursor:
    """Reads little-endian values from a buffer, refusing any read that would pass its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def error(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}")

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise self.error(
                f"{what} at byte {self.pos} needs {n} bytes but only {self.remaining()} remain "
                "(the file is truncated or corrupt)"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def count(self, what: str, min_item_size: int) -> int:
        """A uint64 count of items, each at least `min_item_size` bytes, that must fit in the file."""
        at = self.pos
        n = self.unpack("<Q", what)
        if n * min_item_size > self.remaining():
            raise self.error(
                f"{what} {n} at byte {at} cannot fit in the {self.remaining()} bytes left in the file "
                "(the file is truncated or corrupt)"
            )
        return n

    def string(self, what: str) -> str:
        at = self.pos
        n = self.count(f"length of {what}", 1)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} at byte {at} is not valid UTF-8") from None

    def strings(self, n: int, what: str) -> list[str]:
        """`n` strings in a row, as `string` reads them but without its per-call cost (a vocabulary
        holds ~10^5). At the first one that is cut off or not UTF-8, `string` takes over to say why."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        for _ in range(n):
            if size - pos < 8:
                break
            end = pos + 8 + _U64.unpack_from(buf, pos)[0]
            if end > size:
                break
            try:
                out.append(str(buf[pos + 8 : end], "utf-8"))
            except UnicodeDecodeError:
                break
            pos = end
        self.pos = pos
        out.extend(self.string(what) for _ in range(n - len(out)))
        return out

    def value_type(self, key: str) -> GGUFValueType:
        at = self.pos
        code = self.unpack("<I", f"value type of {key!r}")
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.error(f"metadata key {key!r} has unknown value type {code} at byte {at}") from None

    def value(self, vtype: GGUFValueType, key: str, depth: int = 0) -> Any:
        if vtype == _T.STRING:
            return self.string(f"value of {key!r}")
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], f"value of {key!r}")
        # ARRAY: element type, count, elements
        if depth >= _MAX_NESTING:
            raise self.error(f"metadata key {key!r} nests arrays more than {_MAX_NESTING} deep")
        etype = self.value_type(key)
        n = self.count(f"array length of {key!r}", _MIN_SIZE[etype])
        if etype in _SCALARS:
            dtype = np.dtype(_SCALARS[etype].replace("?", "u1"))
            values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
            self.pos += n * dtype.itemsize
            return values.astype(bool).tolist() if etype == _T.BOOL else values.tolist()
        if etype == _T.STRING:
            return self.strings(n, f"value of {key!r}")
        return [self.value(etype, key, depth + 1) for _ in range(n)]


def _open(path: Path) -> mmap.mmap:
    try:
        size = os.stat(path).st_size
        if not path.is_file():
            raise CheckpointError(f"{path} is not a file")
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise CheckpointError(f"GGUF file {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read GGUF file {path}: {exc.strerror or exc}") from None
    if not head.startswith(_MAGIC):
        if size == 0:
            raise CheckpointError(f"{path} is empty, not a GGUF file")
        if _MAGIC.startswith(head):
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a GGUF header")
        raise CheckpointError(f"{path} is not a GGUF file: it starts with {head[:4]!r}, expected {_MAGIC!r}")
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate the header, metadata and tensor table of the GGUF file at `path`.

    Raises CheckpointError (naming the file and the problem) for a bad magic or version, a count
    or length larger than the file can hold, a truncated file, an unknown value or tensor type, a
    tensor size of 2^63 or more (even next to a zero), a misaligned tensor, or tensor data that
    runs past the end of the file or overlaps another's.
    Only reads; nothing is written.
    """
    path = Path(path)
    mapped = _open(path)
    cur = _Cursor(mapped, path)  # slices of a map are bytes: decoding 10^5 strings is faster than from a memoryview
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
            raise CheckpointError(f"{path} is a big-endian GGUF file, which qkv does not read")
        raise CheckpointError(
            f"{path} has GGUF version {version}; qkv reads versions {', '.join(map(str, SUPPORTED_VERSIONS))} "
            "(re-convert it with a current llama.cpp)"
        )
    n_tensors = cur.count("tensor count", 0)
    n_kv = cur.count("metadata count", 0)
    # The counts are checked against the space the records need (not at read time: the
    # record sizes are only known as they are read).
    if n_kv * _KV_MIN_SIZE + n_tensors * _TENSOR_INFO_MIN_SIZE > cur.remaining():
        raise cur.error(
            f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than the "
            f"{cur.remaining()} bytes after the header can hold (the file is truncated or its header corrupt)"
        )

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        if key in metadata:
            raise cur.error(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.value_type(key), key)

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
        raise cur.error(f"general.alignment={alignment!r} must be a positive power of two")

    infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]] = []
    for _ in range(n_tensors):
        at = cur.pos
        name = cur.string("tensor name")
        n_dims = cur.unpack("<I", f"dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.error(f"tensor {name!r} at byte {at} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = [cur.unpack("<Q", f"dimension of tensor {name}") for _ in range(n_dims)]
        if max(dims) >= MAX_ELEMENTS or math.prod(dims) >= MAX_ELEMENTS:  # checked even when a dim is 0
            raise cur.error(
                f"tensor {name!r} at byte {at} has dimensions {dims}: sizes and their product must stay below "
                "2^63 (the tensor table is corrupt)"
            )
        code = cur.unpack("<I", f"type of tensor {name}")
        try:
            qtype = GGMLQuantizationType(code)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise cur.error(f"tensor {name} has unknown type id {code} (not a ggml tensor type)") from None
        offset = cur.unpack("<Q", f"data offset of tensor {name}")
        if dims[0] % block:
            raise cur.error(f"tensor {name}: row length {dims[0]} is not a multiple of the {qtype.name} block {block}")
        if offset % alignment:
            raise cur.error(f"tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}")
        infos.append((name, tuple(reversed(dims)), qtype, offset, math.prod(dims) // block * type_size))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, qtype, offset, n_bytes in infos:
        if name in tensors:
            raise cur.error(f"tensor {name} appears twice in the tensor table")
        start = data_offset + offset
        if start + n_bytes > cur.size:
            raise cur.error(
                f"tensor {name} ({qtype.name}, shape {shape}) needs bytes [{start}, {start + n_bytes}) but the "
                f"file ends at {cur.size} (truncated file or corrupt offset)"
            )
        tensors[name] = TensorInfo(name, shape, qtype, start, n_bytes)
    by_start = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in itertools.pairwise(by_start):
        if a.offset + a.n_bytes > b.offset:
            raise cur.error(
                f"tensor {a.name} (bytes [{a.offset}, {a.offset + a.n_bytes})) overlaps tensor {b.name} "
                f"(starting at byte {b.offset}); the tensor table is corrupt"
            )
    data = np.frombuffer(mapped, dtype=np.uint8)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, data, _map=mapped)
