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


def _float32_matmul_ran(out: torch.Tensor) -> bool:
    """Whether `qkv::float32_matmul` (oneDNN) is in the autograd graph that produced `out`."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "float32_matmul" in type(fn).__name__:
            return True
        todo += [f for f, _ in fn.next_functions]
    return False


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen-weight"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided-input"])
@pytest.mark.parametrize("n_in, n_out", [(64, 96), (96, 64)], ids=["widening", "narrowing"])  # both dw orders
def test_float32_training_path_matches_float64(bias, frozen, transposed, n_in, n_out):
    # float32 training runs forward, dx and dw through oneDNN: as close to float64 as F.linear is.
    torch.manual_seed(0)
    layer = Linear(n_in, n_out, bias=bias).requires_grad_(not frozen)
    x = torch.randn(9, 5, n_in)
    x = (x.transpose(0, 1) if transposed else x).requires_grad_(True)
    grad = torch.randn(*x.shape[:-1], n_out)
    out = layer(x)
    assert _float32_matmul_ran(out)
    out.backward(grad)
    ref = [t.detach().double().requires_grad_(True) for t in (x, layer.weight, layer.bias) if t is not None]
    F.linear(*ref).backward(grad.double())
    torch.testing.assert_close(out.double(), F.linear(*ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref[0].grad, rtol=1e-5, atol=1e-5)
    if frozen:
        assert layer.weight.grad is None
    else:
        torch.testing.assert_close(layer.weight.grad.double(), ref[1].grad, rtol=1e-5, atol=1e-4)
        if bias:
            torch.testing.assert_close(layer.bias.grad.double(), ref[2].grad, rtol=1e-5, atol=1e-5)


def test_float32_training_path_stays_out_of_autocast_no_grad_and_eval():
    layer = Linear(32, 16)
    x = torch.randn(2, 32)
    assert torch.equal(layer.eval()(x), F.linear(x, layer.weight, layer.bias))  # eval mode, even with grad on
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and not _float32_matmul_ran(out)  # autocast's bf16 linear
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
