"""Loss curves: train and eval loss against the optimizer step, as a PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qkv.atomic import atomic_path


def plot_loss_curve(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Draw train `loss` and `eval_loss` against `step` into a PNG; returns its path.

    Uses matplotlib's Agg canvas directly (no pyplot), so it needs no display and leaves the
    caller's matplotlib backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, style in (("loss", "train", "-"), ("eval_loss", "eval", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
