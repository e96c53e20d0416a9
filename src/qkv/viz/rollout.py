"""Attention over images: the [CLS] token's attention over patches, and attention rollout.

Rollout (Abnar & Zuidema 2020, §3) follows attention through the layers: each layer's weights,
averaged over heads, are mixed with the identity for the residual connection, (A + I) / 2 (rows
still sum to 1), and multiplied from the first layer up. Row 0 of the product says how much each
input patch flows into the final [CLS] token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from qkv.atomic import atomic_path
from qkv.errors import UsageError


def attention_rollout(weights: torch.Tensor, residual: bool = True) -> torch.Tensor:
    """weights [L, H, T, T] -> rollout [T, T]: the product over layers of the head-averaged
    attention, with (A + I) / 2 for the residual stream when `residual`."""
    if weights.dim() != 4 or weights.shape[-1] != weights.shape[-2]:
        raise UsageError(f"rollout needs self-attention weights [layers, heads, T, T], got {tuple(weights.shape)}")
    T = weights.shape[-1]
    rollout = torch.eye(T, dtype=torch.float64)
    for layer in weights.double():
        a = layer.mean(dim=0)
        if residual:
            a = (a + torch.eye(T, dtype=a.dtype)) / 2
        rollout = a @ rollout
    return rollout.float()


def patch_grid(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-patch values [..., N] (the [CLS] position dropped) as images [..., gh, gw]."""
    gh, gw = grid
    if values.shape[-1] != gh * gw:
        raise UsageError(f"{values.shape[-1]} patch values do not fill a {gh} x {gw} patch grid")
    return values.reshape(*values.shape[:-1], gh, gw)


def plot_image_attention(
    weights: torch.Tensor,
    image: np.ndarray,
    grid: tuple[int, int],
    path: str | os.PathLike,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
) -> str:
    """Draw the image with its attention rollout laid over it, then, per layer and head, where the
    [CLS] token looks (one heat map over the patch grid each); save a PNG atomically.

    weights: [L, H, 1 + N, 1 + N] of a ViT ([CLS] first); image: [height, width, 3] in [0, 1] as
    shown to the model (after resizing and cropping); grid: the patch grid (gh, gw).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from qkv.viz.attention import _select

    L, H = weights.shape[:2]
    rows, cols = _select(L, layers, "layer"), _select(H, heads, "head")
    rollout = patch_grid(attention_rollout(weights)[0, 1:], grid)
    cls_maps = patch_grid(weights[:, :, 0, 1:].float(), grid)
    heat = torch.nn.functional.interpolate(rollout[None, None], size=image.shape[:2], mode="bilinear")[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)

    n_cols = max(len(cols), 2)
    fig = Figure(figsize=(1.8 * n_cols + 1, 1.8 * (len(rows) + 1) + 1))
    FigureCanvasAgg(fig)  # no pyplot: the caller's backend is left alone
    axes = fig.subplots(len(rows) + 1, n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].imshow(np.clip(image, 0, 1))
    axes[0][0].set_title("image", fontsize=8)
    axes[0][1].imshow(np.clip(image, 0, 1))
    axes[0][1].imshow(heat.numpy(), cmap="inferno", alpha=0.55)
    axes[0][1].set_title("attention rollout", fontsize=8)
    for ax in axes[0][2:]:
        ax.axis("off")
    for r, layer in enumerate(rows, start=1):
        for c, head in enumerate(cols):
            axes[r][c].imshow(cls_maps[layer, head].numpy(), cmap="viridis", interpolation="nearest")
            axes[r][c].set_title(f"[CLS] · layer {layer} · head {head}", fontsize=6)
        for ax in axes[r][len(cols) :]:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return str(path)
