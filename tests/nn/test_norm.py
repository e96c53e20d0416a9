"""Normalisation (`qkv.nn.norm`): RMSNorm against transformers' LlamaRMSNorm, LayerNorm against
torch's functional layer_norm, both computed in float32 under bf16 inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qkv.config import ModelConfig
from qkv.nn.norm import RMSNorm, make_norm

D = 48


pytestmark = pytest.mark.usefixtures("seeded")


def cfg(**overrides) -> ModelConfig:
    return ModelConfig(d_model=D, n_heads=4, **overrides)


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1])
def test_rmsnorm_equals_llama(eps):
    ours, ref = RMSNorm(D, eps), LlamaRMSNorm(D, eps)
    weight = torch.randn(D)
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    x = torch.randn(3, 5, D) * 4
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    # Zhang & Sennrich 2019, eq. 4: x / RMS(x) * g
    rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    torch.testing.assert_close(ours(x), x / rms * weight)


def test_rmsnorm_computes_in_float32_under_bf16():
    ours, ref = RMSNorm(D, 1e-6).to(torch.bfloat16), LlamaRMSNorm(D, 1e-6).to(torch.bfloat16)
    weight = torch.randn(D).to(torch.bfloat16)
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    x = (torch.randn(4, 7, D) * 30).to(torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref(x), atol=0, rtol=0)
    x32 = x.float()
    expected = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_equals_torch_functional(bias):
    norm = make_norm(cfg(norm="layernorm", norm_bias=bias, norm_eps=1e-3))
    assert isinstance(norm, torch.nn.LayerNorm) and (norm.bias is not None) == bias
    with torch.no_grad():
        norm.weight.normal_()
        if bias:
            norm.bias.normal_()
    x = torch.randn(2, 6, D) * 3 + 1
    expected = F.layer_norm(x, (D,), norm.weight, norm.bias, eps=1e-3)
    torch.testing.assert_close(norm(x), expected, atol=0, rtol=0)
    # Ba et al. 2016: (x - mean) / sqrt(var + eps) * g + b, biased variance
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    by_hand = (x - mean) / (var + 1e-3).sqrt() * norm.weight + (norm.bias if bias else 0)
    torch.testing.assert_close(norm(x), by_hand, atol=1e-5, rtol=1e-5)


def test_layernorm_under_bf16_is_float32_rounded_once():
    norm = make_norm(cfg(norm="layernorm")).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(3, 5, D) * 30 + 100).to(torch.bfloat16)  # large mean: bf16 arithmetic would lose it
    out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = F.layer_norm(x.float(), (D,), norm.weight.float(), norm.bias.float(), eps=1e-5)
    torch.testing.assert_close(out, expected.to(torch.bfloat16), atol=0, rtol=0)


def test_make_norm_picks_the_configured_layer():
    norm = make_norm(cfg(norm="rmsnorm", norm_eps=1e-4), dim=32)
    assert isinstance(norm, RMSNorm) and norm.eps == 1e-4 and norm.weight.shape == (32,)
