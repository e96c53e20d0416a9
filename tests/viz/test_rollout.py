"""Attention rollout (Abnar & Zuidema 2020) and the image attention picture, on a tiny ViT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.config import ModelConfig
from qkv.models import VisionTransformer
from qkv.viz import attention_maps, attention_rollout, plot_image_attention


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    cfg = ModelConfig(family="vit", vocab_size=None, d_model=32, n_layers=3, n_heads=4, image_size=16, patch_size=4)
    model = VisionTransformer(cfg).eval()
    return attention_maps(model, torch.randn(1, 3, 16, 16))


def test_weights_of_a_vit_cover_cls_and_patches(weights):
    assert weights.shape == (3, 4, 17, 17)


def test_rollout_equals_a_direct_computation(weights):
    """The paper's recipe written out with numpy: per layer, heads averaged, plus I, rows
    renormalised, multiplied from the first layer up."""
    direct = np.eye(17)
    for layer in weights.double().numpy():
        a = layer.mean(axis=0) + np.eye(17)
        a = a / a.sum(axis=-1, keepdims=True)
        direct = a @ direct
    assert np.allclose(attention_rollout(weights).numpy(), direct, atol=1e-6)
    assert torch.allclose(attention_rollout(weights).sum(-1), torch.ones(17), atol=1e-5)  # still a mixing matrix


def test_rollout_without_residual_is_the_plain_product(weights):
    plain = weights[0].mean(0).double()
    for layer in weights[1:]:
        plain = layer.mean(0).double() @ plain
    assert torch.allclose(attention_rollout(weights, residual=False), plain.float(), atol=1e-6)


def test_image_attention_png(weights, tmp_path):
    image = np.random.default_rng(0).random((16, 16, 3))
    path = plot_image_attention(weights, image, (4, 4), tmp_path / "vit.png", layers=[0, 2])
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="do not fill a 5 x 5 patch grid"):
        plot_image_attention(weights, image, (5, 5), tmp_path / "bad.png")
