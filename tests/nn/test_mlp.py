"""Feed-forward (`qkv.nn.mlp`): each activation and the gated variants against explicit formulas,
GPT-2's gelu_new from transformers' ACT2FN, and SwiGLU against transformers' LlamaMLP."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP

from qkv.config import ModelConfig
from qkv.nn.mlp import ACTIVATIONS, MLP

D, FF = 16, 24


pytestmark = pytest.mark.usefixtures("seeded")


def gelu(x):  # Hendrycks & Gimpel 2016: x * Phi(x)
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_tanh(x):  # the tanh approximation GPT-2 uses
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


FORMULAS = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": lambda x: x.clamp(min=0),
    "silu": lambda x: x * torch.sigmoid(x),  # Ramachandran et al. 2017 (swish, beta=1)
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's sigmoid approximation of GELU
}
GATED = {"swiglu": FORMULAS["silu"], "geglu": gelu, "geglu_tanh": gelu_tanh}  # Shazeer 2020


def make_mlp(mlp: str, bias: bool) -> MLP:
    return MLP(ModelConfig(d_model=D, n_heads=2, d_ff=FF, mlp=mlp, mlp_bias=bias)).eval()


def test_every_configurable_mlp_has_a_formula_here():
    assert set(ACTIVATIONS) == set(FORMULAS) | set(GATED)


@pytest.mark.parametrize("name", FORMULAS)
def test_activation_equals_formula(name):
    x = torch.linspace(-6, 6, 241)
    torch.testing.assert_close(ACTIVATIONS[name](x), FORMULAS[name](x), atol=1e-6, rtol=1e-5)


def test_gelu_tanh_is_transformers_gelu_new():
    x = torch.randn(1000) * 3
    torch.testing.assert_close(ACTIVATIONS["gelu_tanh"](x), ACT2FN["gelu_new"](x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ACTIVATIONS["gelu"](x), ACT2FN["gelu"](x), atol=0, rtol=0)
    torch.testing.assert_close(ACTIVATIONS["quick_gelu"](x), ACT2FN["quick_gelu"](x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", FORMULAS)
@pytest.mark.parametrize("bias", [True, False])
def test_plain_mlp_equals_down_act_up(name, bias):
    mlp = make_mlp(name, bias)
    assert mlp.up.weight.shape == (FF, D)
    x = torch.randn(2, 5, D)
    h = FORMULAS[name](x @ mlp.up.weight.T + (mlp.up.bias if bias else 0))
    expected = h @ mlp.down.weight.T + (mlp.down.bias if bias else 0)
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("bias", [True, False])
def test_gated_mlp_equals_separate_gate_and_up(name, bias):
    """down(act(x W_gate) * (x W_up)); the fused `up` holds the gate rows first."""
    mlp = make_mlp(name, bias)
    assert mlp.up.weight.shape == (2 * FF, D)
    w_gate, w_up = mlp.up.weight[:FF], mlp.up.weight[FF:]
    b_gate, b_up = (mlp.up.bias[:FF], mlp.up.bias[FF:]) if bias else (0, 0)
    x = torch.randn(2, 5, D)
    h = GATED[name](x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)
    expected = h @ mlp.down.weight.T + (mlp.down.bias if bias else 0)
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_swiglu_equals_llama_mlp():
    mlp = make_mlp("swiglu", bias=False)
    ref = LlamaMLP(LlamaConfig(hidden_size=D, num_attention_heads=2, intermediate_size=FF, hidden_act="silu"))
    with torch.no_grad():
        ref.gate_proj.weight.copy_(mlp.up.weight[:FF])
        ref.up_proj.weight.copy_(mlp.up.weight[FF:])
        ref.down_proj.weight.copy_(mlp.down.weight)
    x = torch.randn(3, 4, D)
    torch.testing.assert_close(mlp(x), ref(x), atol=1e-6, rtol=1e-5)
