"""`qkv.load`: format dispatch, dtype names, and errors that list what is supported."""

import pytest
import torch

import qkv
from qkv.checkpoints import save_native
from qkv.errors import CheckpointError
from qkv.loading import load


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = qkv.DecoderLM(qkv.ModelConfig.from_name("tiny-llama", vocab_size=64, d_model=32, n_layers=1))
    return model, save_native(model, tmp_path_factory.mktemp("load") / "ckpt")


def test_loads_a_native_checkpoint(checkpoint):
    model, path = checkpoint
    loaded = load(path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.bfloat16])
def test_dtype_by_name_or_object(checkpoint, dtype):
    assert load(checkpoint[1], dtype=dtype).lm_head.weight.dtype == torch.bfloat16


def test_unknown_format_lists_the_supported_ones(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"not in a format qkv can load.*qkv: a qkv checkpoint directory"):
        load(tmp_path / "weights.bin")


def test_missing_source(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nothing")


def test_bad_arguments(checkpoint):
    with pytest.raises(ValueError, match="dtype"):
        load(checkpoint[1], dtype="float8")
    with pytest.raises(ValueError, match="quantize"):
        load(checkpoint[1], quantize="int3")


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantize_keeps_rope_frequencies_in_float32(checkpoint, scheme):
    """quantize= casts to bfloat16 afterwards; the RoPE frequencies are recomputed, not rounded."""
    from qkv.nn.position import rope_inv_freq
    from qkv.nn.quant import QuantLinear

    model = load(checkpoint[1], quantize=scheme)
    assert isinstance(model.blocks[0].mlp.up, QuantLinear) and model.dtype == torch.bfloat16
    assert torch.equal(model.rope.inv_freq, rope_inv_freq(model.config)[0])


def test_a_failed_load_leaves_the_allocator_as_after_a_load(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("qkv.memory.reuse_large_blocks", lambda: calls.append("reuse"))
    with pytest.raises(CheckpointError):
        load(tmp_path / "nothing")
    assert calls == ["reuse"]
