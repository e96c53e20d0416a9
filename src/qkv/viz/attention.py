"""Attention maps: per-layer, per-head heatmaps of attention weights with the tokens on the axes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from qkv.atomic import atomic_path


@torch.no_grad()
def attention_maps(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Attention weights of every layer for one sequence: input_ids [1, T] -> [L, H, T, T]."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"attention_maps takes one sequence of shape [1, T], got {tuple(input_ids.shape)}")
    out = model(input_ids, output_attentions=True)
    return torch.stack([a[0].float() for a in out.attentions])


def _select(n: int, chosen: Sequence[int] | None, what: str) -> list[int]:
    if chosen is None:
        return list(range(n))
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(f"{what} {bad} out of range: the model has {n} {what}s (0..{n - 1})")
    return list(chosen)


def plot_attention(
    weights: torch.Tensor,
    tokens: Sequence[str],
    path: str | os.PathLike,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
) -> str:
    """Draw weights [L, H, T, T] as a grid (rows: layers, columns: heads) and save a PNG atomically.

    Tokens label the axes (queries down, keys across) when there are few enough to read.
    Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L, H, T, S = weights.shape
    if len(tokens) != T:
        raise ValueError(f"got {len(tokens)} token labels for attention over {T} positions")
    rows, cols = _select(L, layers, "layer"), _select(H, heads, "head")
    cell = max(1.6, min(0.28 * T, 6.0))
    fig = Figure(figsize=(cell * len(cols) + 1, cell * len(rows) + 1))
    FigureCanvasAgg(fig)  # no pyplot: no display needed, the caller's backend is left alone
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    show_labels = T <= 48
    for r, layer in enumerate(rows):
        for c, head in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} · head {head}", fontsize=8)
            if show_labels:
                ax.set_xticks(range(S), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(T), labels, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return str(path)
