"""GGUF tensor data: qkv's torch dequantization equals the `gguf` package's reference, bit for bit.

Random blocks cover every quant value and sign; the scales are random finite fp16 numbers
(including subnormal and negative ones). Results are compared as raw bits, not with a tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qkv.formats.gguf import TORCH_KERNELS, read_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

SHAPE = (12, 96)  # three Q blocks per row
# Byte ranges holding fp16 scales in each block type (ggml-common.h).
SCALES = {Q.Q8_0: (0, 2), Q.Q4_0: (0, 2), Q.Q4_1: (0, 4)}


def random_blocks(qtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Raw tensor bytes [rows, bytes per row] of `qtype`: random quants, finite random fp16 scales."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal(shape).astype(np.float32) * 10.0 ** rng.integers(
            -6, 4, shape
        )  # within fp16's range
        return gguf.quants.quantize(values, qtype) if qtype != Q.BF16 else _bf16(values)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (math.prod(shape) // block, type_size), dtype=np.uint8)
    lo, hi = SCALES[qtype]
    scales = rng.standard_normal((blocks.shape[0], (hi - lo) // 2)) * 10.0 ** rng.integers(-7, 3, (blocks.shape[0], 1))
    blocks[:, lo:hi] = scales.astype(np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def _bf16(values: np.ndarray) -> np.ndarray:
    return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(values.shape[0], -1)


def write(path, tensors: dict[str, tuple[np.ndarray, Q]], alignment: int | None = None):
    w = gguf.GGUFWriter(path, "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read_gguf(path)


def reference(file, name: str) -> np.ndarray:
    info = file.tensors[name]
    return gguf.quants.dequantize(file.raw(name), info.qtype).reshape(info.shape).astype(np.float32)


def same_bits(ours: torch.Tensor, theirs: np.ndarray) -> bool:
    return np.array_equal(ours.contiguous().numpy().view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qtype", list(TORCH_KERNELS), ids=lambda q: q.name)
def test_torch_dequantization_is_bit_exact(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    file = write(tmp_path / "t.gguf", {"w": (random_blocks(qtype, SHAPE, rng), qtype)})
    assert same_bits(file.tensor("w"), reference(file, "w"))
    assert same_bits(torch.from_numpy(file.dequantize("w")), reference(file, "w"))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_real_values_are_bit_exact(tmp_path, qtype):
    values = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    file = write(tmp_path / "t.gguf", {"w": (gguf.quants.quantize(values, qtype), qtype)})
    assert same_bits(file.tensor("w"), reference(file, "w"))


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_dequantize_into_slices_and_views(tmp_path, qtype):
    """`out=` takes a slice of a bigger tensor, a permuted view, or another dtype."""
    file = write(tmp_path / "t.gguf", {"w": (random_blocks(qtype, SHAPE, np.random.default_rng(1)), qtype)})
    expected = torch.from_numpy(reference(file, "w"))
    fused = torch.full((SHAPE[0] + 4, SHAPE[1]), float("nan"))
    file.tensor("w", out=fused[2 : 2 + SHAPE[0]])
    assert torch.equal(fused[2 : 2 + SHAPE[0]], expected) and fused[:2].isnan().all() and fused[-2:].isnan().all()
    permuted = torch.empty(SHAPE)
    file.tensor("w", out=permuted.view(3, 2, 2, SHAPE[1]).transpose(1, 2))
    assert torch.equal(permuted.view(3, 2, 2, -1).transpose(1, 2).reshape(SHAPE), expected)
    assert torch.equal(file.tensor("w", out=torch.empty(SHAPE, dtype=torch.bfloat16)), expected.bfloat16())
    with pytest.raises(ValueError, match="cannot dequantize it into a tensor of shape"):
        file.tensor("w", out=torch.empty(SHAPE[0], SHAPE[1] + 1))


def test_unaligned_data_falls_back_to_the_reference(tmp_path):
    """With general.alignment 1 a tensor may start anywhere, where torch cannot view its fp16 scales."""
    rng = np.random.default_rng(2)
    tensors = {
        "a": (random_blocks(Q.Q8_0, (1, 32), rng), Q.Q8_0),
        "b": (random_blocks(Q.Q4_1, SHAPE, rng), Q.Q4_1),
        "c": (random_blocks(Q.F32, SHAPE, rng), Q.F32),
    }
    file = write(tmp_path / "t.gguf", tensors, alignment=1)
    assert file.tensors["b"].offset % 4 and file.tensors["c"].offset % 4
    for name in tensors:
        assert same_bits(file.tensor(name), reference(file, name))


def test_string_arrays_match_the_gguf_reader(tmp_path):
    tokens = ["a", "", "héllo", "日本", "🙂", " " * 300]
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert read_gguf(tmp_path / "t.gguf").metadata["tokenizer.ggml.tokens"] == tokens


def test_bad_utf8_in_a_string_array_names_the_key(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    w.add_array("tokenizer.ggml.tokens", ["ok", "bad!"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = bytearray((tmp_path / "t.gguf").read_bytes())
    data[data.index(b"bad!") + 3] = 0xFF
    (tmp_path / "t.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"value of 'tokenizer\.ggml\.tokens' at byte \d+ is not valid UTF-8"):
        read_gguf(tmp_path / "t.gguf")


@pytest.mark.parametrize("alignment", [None, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_form_is_the_files_blocks(tmp_path, qtype, alignment):
    """`quantized` gives the blocks' own values (Q4: two a byte, column 2j in the low nibble) and fp16
    scales, with zero = m + 8d for Q4_1; into new tensors, and through a slice and a permuted view."""
    from qkv.nn.quant import pack_nibbles

    blocks = random_blocks(qtype, SHAPE, np.random.default_rng(3))
    file = write(tmp_path / "t.gguf", {"pad": (random_blocks(Q.Q8_0, (1, 32), np.random.default_rng(4)), Q.Q8_0),
                                       "w": (blocks, qtype)}, alignment=alignment)  # fmt: skip
    raw = torch.from_numpy(blocks.copy()).view(SHAPE[0], -1, gguf.GGML_QUANT_SIZES[qtype][1])
    scale = raw[..., 0:2].contiguous().view(torch.float16).float()[..., 0]
    if qtype == Q.Q8_0:
        expected = {"qweight": raw[..., 2:].contiguous().view(torch.int8).reshape(SHAPE), "scales": scale}
    else:
        quants = raw[..., -16:]
        values = torch.cat((quants & 15, quants >> 4), dim=-1).reshape(SHAPE)  # elements j, j + 16 in byte j
        m = raw[..., 2:4].contiguous().view(torch.float16).float()[..., 0] if qtype == Q.Q4_1 else None
        zeros = torch.zeros_like(scale) if m is None else m + 8 * scale
        expected = {"qweight": pack_nibbles(values), "scales": scale, "zeros": zeros}
    stored = file.quantized("w")
    assert stored.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(stored[key], tensor), key
    fused = {key: torch.full((SHAPE[0] + 3, *t.shape[1:]), 7, dtype=t.dtype) for key, t in expected.items()}
    file.quantized("w", out={key: t[1 : 1 + SHAPE[0]].view(3, 2, 2, -1).transpose(1, 2) for key, t in fused.items()})
    for key, tensor in expected.items():
        rows = fused[key][1 : 1 + SHAPE[0]].view(3, 2, 2, -1).transpose(1, 2).reshape(tensor.shape)
        assert torch.equal(rows, tensor) and (fused[key][0] == 7).all() and (fused[key][-2:] == 7).all(), key
    with pytest.raises(ValueError, match="should be"):
        file.quantized("w", out={key: t[:-1] for key, t in stored.items()})
