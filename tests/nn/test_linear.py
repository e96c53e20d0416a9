"""qkv.nn.Linear: the packed bf16 inference path equals F.linear exactly, and never gets in the way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkv.nn import linear as linear_mod
from qkv.nn.linear import Linear

pytestmark = pytest.mark.skipif(not linear_mod.packing_available(), reason="no oneDNN packing in this torch build")


@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 64), (2, 7, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_bf16_equals_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=bias).to(torch.bfloat16)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        assert layer._packed is not None  # the packed path ran
        assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


def test_weight_update_repacks():
    layer = Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2)  # in-place change bumps the version counter
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_training_path_has_gradients():
    layer = Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None
    assert layer._packed is None


def test_float32_takes_plain_path():
    layer = Linear(32, 16)
    with torch.no_grad():
        layer(torch.randn(2, 32))
    assert layer._packed is None
