"""A token embedding read from its tied packed head: rows equal the dense table's, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv.nn.packed_embedding import TiedPackedEmbedding
from qkv.nn.quant import QuantLinear, dequantize_model, quantize_weight


def packed_head(rows: int, bits: int, group: int | None, prepared: bool) -> QuantLinear:
    weight = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows + bits))
    layer = QuantLinear(64, rows, bits=bits, group_size=group, device="meta")
    layer.assign(quantize_weight(weight, bits, group))
    if prepared:
        layer.prepare(torch.bfloat16)  # the kernel form; whole 64-row blocks release the stored copy
    return layer


SCHEMES = [(4, 32), (8, 32), (8, None)]


@pytest.mark.parametrize("rows", [128, 96])
@pytest.mark.parametrize("prepared", [False, True], ids=["stored", "kernel-form"])
@pytest.mark.parametrize("bits, group", SCHEMES, ids=["int4", "int8-group", "int8-channel"])
def test_rows_equal_the_dequantized_table(rows, prepared, bits, group):
    """`rows(ids, dtype)` is `dequantize()[ids]` rounded once to dtype, from the stored form and
    from the packed kernel form alike (ids across 64-row blocks and both nibble halves)."""
    layer = packed_head(rows, bits, group, prepared)
    if prepared and rows % 64 == 0 and group is not None:
        assert layer._released  # the values now live only in the kernel form
    ids = torch.tensor([0, 1, 31, 32, 33, 63, 64, 65, rows - 1, 5, 5])
    table = layer.dequantize(torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(layer.rows(ids, dtype), table[ids].to(dtype))


def test_rows_out_of_range_is_an_index_error():
    layer = packed_head(64, 8, 32, True)
    with pytest.raises(IndexError, match=r"\[0, 64\)"):
        layer.rows(torch.tensor([3, 64]))
    with pytest.raises(IndexError):
        layer.rows(torch.tensor([-1]))


def test_embedding_module_is_the_dense_table():
    """Forward over [B, T] ids, `weight`, the state dict and `.to(dtype)` behave as `nn.Embedding`
    holding the table would; `dequantize_model` makes it a plain embedding again."""
    head = packed_head(128, 8, 32, True)
    embedding = TiedPackedEmbedding(head, torch.bfloat16)
    dense = nn.Embedding.from_pretrained(head.dequantize(torch.float32).to(torch.bfloat16))
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(embedding(ids), dense(ids))
    assert torch.equal(embedding.weight, dense.weight)
    assert list(embedding.state_dict()) == ["weight"] and torch.equal(embedding.state_dict()["weight"], dense.weight)
    assert not list(embedding.parameters())  # nothing held: the head owns the values
    embedding.to(torch.float32)
    assert embedding(ids).dtype == torch.float32
    assert torch.equal(embedding(ids), head.dequantize(torch.float32)[ids])

    model = nn.Module()
    model.lm_head, model.embed = head, nn.Module()
    model.embed.tokens = TiedPackedEmbedding(head, torch.bfloat16)
    dequantize_model(model)
    assert isinstance(model.embed.tokens, nn.Embedding) and torch.equal(model.embed.tokens(ids), dense(ids))
