"""Attention maps: per-layer, per-head heatmaps of attention weights with the tokens on the axes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from qkv.atomic import atomic_path
from qkv.errors import UsageError
from qkv.interpret.ablation import KINDS


@torch.no_grad()
def attention_maps(
    model: torch.nn.Module, input_ids: torch.Tensor, target_ids: torch.Tensor | None = None, kind: str = "self"
) -> torch.Tensor:
    """Attention weights of every layer for one sequence: input_ids [1, T] -> [L, H, T, T]
    (a ViT takes one image [1, C, H, W] as input_ids and gives [L, H, 1 + N, 1 + N]).

    Encoder-decoders take the source as input_ids [1, S] and the target as target_ids [1, T]:
    kind "self" gives the decoder's maps [L, H, T, T], "encoder" the encoder's [L, H, S, S] and
    "cross" the decoder-to-source maps [L, H, T, S].
    """
    if input_ids.shape[0] != 1 or input_ids.dim() != (4 if getattr(model.config, "family", None) == "vit" else 2):
        raise UsageError(
            f"attention_maps takes one sequence [1, T] (a ViT: one image [1, C, H, W]), got {tuple(input_ids.shape)}"
        )
    if kind not in KINDS:
        raise UsageError(f"unknown attention kind {kind!r}; choose one of {', '.join(KINDS)}")
    if getattr(model.config, "family", None) == "vit":  # input_ids are the pixel values [1, C, H, W]
        return torch.stack([a[0].float() for a in model(input_ids, output_attentions=True).attentions])
    seq2seq = getattr(model, "is_encoder_decoder", False)
    if seq2seq != (target_ids is not None) or (kind != "self" and not seq2seq):
        raise UsageError(
            "an encoder-decoder needs target_ids (the decoder's tokens) and offers kinds self, encoder and cross; "
            "other models take input_ids alone and offer kind='self'"
        )
    if seq2seq:
        out = model(input_ids, decoder_input_ids=target_ids, output_attentions=True)
        chosen = {"self": out.attentions, "encoder": out.encoder_attentions, "cross": out.cross_attentions}[kind]
    else:
        chosen = model(input_ids, output_attentions=True).attentions
    return torch.stack([a[0].float() for a in chosen])


def _select(n: int, chosen: Sequence[int] | None, what: str) -> list[int]:
    if chosen is None:
        return list(range(n))
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise UsageError(f"{what} {bad} out of range: the model has {n} {what}s (0..{n - 1})")
    return list(chosen)


def plot_attention(
    weights: torch.Tensor,
    tokens: Sequence[str],
    path: str | os.PathLike,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
    key_tokens: Sequence[str] | None = None,
) -> str:
    """Draw weights [L, H, T, T] as a grid (rows: layers, columns: heads) and save a PNG atomically.

    Tokens label the axes (queries down, keys across) when there are few enough to read.
    Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L, H, T, S = weights.shape
    key_tokens = tokens if key_tokens is None else key_tokens
    if len(tokens) != T or len(key_tokens) != S:
        raise UsageError(
            f"got {len(tokens)} query and {len(key_tokens)} key token labels for attention of {T} x {S} positions"
        )
    rows, cols = _select(L, layers, "layer"), _select(H, heads, "head")
    cell = max(1.6, min(0.28 * T, 6.0))
    fig = Figure(figsize=(cell * len(cols) + 1, cell * len(rows) + 1))
    FigureCanvasAgg(fig)  # no pyplot: no display needed, the caller's backend is left alone
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    key_labels = [t.replace("\n", "\\n") for t in key_tokens]
    show_labels = max(T, S) <= 48
    for r, layer in enumerate(rows):
        for c, head in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} · head {head}", fontsize=8)
            if show_labels:
                ax.set_xticks(range(S), key_labels, rotation=90, fontsize=6)
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
