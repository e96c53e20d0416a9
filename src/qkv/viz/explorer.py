"""The attention explorer: one self-contained HTML page to study a model's attention in a browser.

The page holds everything inline (script, style, data; a ViT's image as a data: URI), so it opens
offline and can be mailed. Weights travel as uint8 (w * 255, rounded: 0.002 steps) and base64, at
most `MAX_CELLS` of them; past that only some query rows are kept (the last ones and those asked
for), and the page says so. Views: a layer x head overview (entropy, mean attention distance),
one head's full map, the weights over the text itself on hover (where a token looks, what looks at
it), attention rollout, an encoder-decoder's three kinds of attention, patches over a ViT's image,
and the logit lens table for decoders. The page's script lives beside this file (explorer.html).
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from qkv.atomic import atomic_write_text
from qkv.errors import UsageError
from qkv.interpret import head_statistics, lens_of_hidden_states
from qkv.viz.rollout import attention_rollout

MAX_CELLS = 6_000_000  # uint8 weights on the page (~8 MB of base64): past it, fewer query rows are kept
FULL_WEIGHTS_LIMIT = 512  # longer decoder prompts take weights for chosen rows only (O(rows x n) memory)
DEFAULT_LONG_ROWS = 32  # rows kept for a long prompt when none are chosen: the last ones
LENS_POSITIONS = 64  # the logit lens table shows at most the last 64 positions
_DATA_MARK = "/*QKV_DATA*/null"


@dataclass
class ExplorerPage:
    """What `write_attention_explorer` wrote: the path, its size, and what it left out (caps)."""

    path: Path
    size: int
    notes: list[str] = field(default_factory=list)


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, before any model work, when the HTML page cannot be written at `path` (not .html,
    a directory, a parent that is a file or read-only); returns it as a Path."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"the explorer writes an HTML page: give a path ending in .html, got {str(path)!r}")
    if path.is_dir():
        raise UsageError(f"{str(path)!r} is a directory; give a file path such as {str(path / 'attention.html')!r}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write {str(path)!r}: {str(parent)!r} is not a writable directory; choose another path"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {str(path)!r}: the file is read-only; choose another path")
    return path


def _b64_weights(weights: torch.Tensor) -> str:
    """[..] in [0, 1] -> base64 of uint8 round(w * 255), row-major."""
    q = (weights.float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy()
    return base64.b64encode(q.tobytes()).decode("ascii")


def _page_rows(n: int, cells_per_row: int, chosen: Sequence[int], max_rows: int | None = None) -> list[int]:
    """Which of n query rows go on the page: all when they fit in MAX_CELLS (and max_rows), else
    the chosen rows (in range already) and then the last ones, as many as fit."""
    room = min(max(1, MAX_CELLS // max(cells_per_row, 1)), n if max_rows is None else max_rows + len(chosen))
    if room >= n:
        return list(range(n))
    keep = sorted(set(chosen))[:room]
    keep += [r for r in range(n - 1, -1, -1) if r not in keep][: room - len(keep)]
    return sorted(keep)


def _view(
    name: str,
    label: str,
    weights: torch.Tensor,
    rows: list[int],
    queries: str,
    keys: str,
    layers: list[int],
    rollout: torch.Tensor | None,
    patch_grid: tuple[int, int] | None = None,
) -> dict:
    """One kind of attention for the page; weights [L, H, R, S] for the query positions `rows`.

    A ViT (patch_grid given) has its mean distance measured between patches on their grid, from the
    patches' attention among themselves (the [CLS] row and column left out, rows renormalised).
    """
    stats = head_statistics(weights, torch.tensor(rows), with_distance=queries == keys)
    distance = stats.distance
    if patch_grid is not None:
        gh, gw = patch_grid
        patch_rows = [i for i, r in enumerate(rows) if r > 0]  # position 0 is [CLS]
        among_patches = weights[:, :, patch_rows, 1:]
        among_patches = among_patches / among_patches.sum(-1, keepdim=True).clamp_min(1e-12)
        grid = torch.cartesian_prod(torch.arange(gh), torch.arange(gw))  # [N, 2] (row, column)
        positions = torch.tensor([rows[i] - 1 for i in patch_rows])
        distance = head_statistics(among_patches, positions, coords=grid).distance
    return {
        "name": name,
        "label": label,
        "queries": queries,
        "keys": keys,
        "layers": layers,
        "heads": weights.shape[1],
        "rows": rows,
        "n_keys": weights.shape[-1],
        "weights": _b64_weights(weights),
        "rollout": _b64_weights(rollout[rows]) if rollout is not None else None,
        "entropy": [[round(v, 3) for v in r] for r in stats.entropy.tolist()],
        "distance": None if distance is None else [[round(v, 2) for v in r] for r in distance.tolist()],
        "distance_unit": "patches" if patch_grid is not None else "tokens",
    }


def _select_layers(n: int, layers: Sequence[int] | None) -> list[int]:
    from qkv.viz.attention import _select

    return _select(n, layers, "layer")


def _image_data_uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rows_note(kept: int, n: int) -> str | None:
    if kept == n:
        return None
    return (
        f"weights for {kept} of {n} query rows: the last ones and any chosen with --rows "
        f"(page cap {MAX_CELLS:,} weights; fewer --layers leave room for more rows)"
    )


def _weights_of(attentions: Sequence[torch.Tensor | None], layers: list[int], rows: list[int] | None) -> torch.Tensor:
    """Per-layer weights [1, H, R, S] -> [len(layers), H, R, S] (the rows picked when given)."""
    w = torch.stack([attentions[i][0].float() for i in layers])
    return w if rows is None else w[:, :, rows]


def _single_stack_view(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    layers: Sequence[int] | None,
    chosen: Sequence[int],
    notes: list[str],
    hidden_states: bool = False,
) -> tuple[dict, tuple[torch.Tensor, ...] | None]:
    """Self-attention of a model with one stack: a decoder or an encoder (inputs: ids [1, T]) or a
    ViT (inputs: pixels [1, C, H, W]). Past FULL_WEIGHTS_LIMIT tokens only some rows are computed.
    Returns the view and, when asked, the same forward's hidden states (a decoder's logit lens)."""
    from qkv.models.stack import resolve_indices

    n_layers, n_heads = len(model.blocks), model.config.n_heads
    picked = _select_layers(n_layers, layers)
    vit = model.config.family == "vit"
    T = None if vit else inputs.shape[1]
    if chosen and vit:
        raise UsageError("--rows picks query rows of a text prompt; a ViT's rows are its patches, all shown")
    # A ViT's page always keeps the [CLS] row: the image shows it until a patch is hovered.
    chosen = [0] if vit else resolve_indices(chosen, T, "--rows", "tokens") if chosen else []
    # One forward for the weights and the lens; a decoder computes the last position's logits alone.
    extra = {"output_hidden_states": True} if hidden_states else {}
    if model.config.family == "decoder":
        extra["logits_to_keep"] = 1
    if T is not None and T > FULL_WEIGHTS_LIMIT:
        rows = _page_rows(T, n_heads * len(picked) * T, chosen, max_rows=DEFAULT_LONG_ROWS)
        out = model(inputs, output_attentions=True, attention_rows=rows, attention_layers=picked, **extra)
        notes.append(
            f"a {T}-token prompt (over {FULL_WEIGHTS_LIMIT}): weights for {len(rows)} query rows, the last ones and "
            "any chosen with --rows (fewer --layers leave room for more), computed beside the fast path; no rollout "
            "(it needs every row)"
        )
        view = _view("self", "self-attention", _weights_of(out.attentions, picked, None), rows, "input", "input",
                     picked, None)  # fmt: skip
        return view, out.hidden_states
    out = model(inputs, output_attentions=True, **extra)
    full = _weights_of(out.attentions, list(range(n_layers)), None)  # [L, H, T, T]
    T = full.shape[-1]
    rows = _page_rows(T, n_heads * len(picked) * T, chosen)
    if note := _rows_note(len(rows), T):
        notes.append(note)
    grid = (inputs.shape[2] // model.config.patch_size, inputs.shape[3] // model.config.patch_size) if vit else None
    view = _view("self", "self-attention", full[picked][:, :, rows], rows, "input", "input", picked,
                 attention_rollout(full), grid)  # fmt: skip
    return view, out.hidden_states


def _seq2seq_views(
    model: torch.nn.Module, source: torch.Tensor, target: torch.Tensor, layers: Sequence[int] | None, notes: list[str]
) -> list[dict]:
    """An encoder-decoder's cross-attention (target rows x source), the decoder's and the encoder's own."""
    out = model(source, decoder_input_ids=target, output_attentions=True)
    n_heads = model.config.n_heads
    views = []
    for name, label, attentions, queries, keys in (
        ("cross", "cross-attention (target -> source)", out.cross_attentions, "target", "source"),
        ("self", "decoder self-attention", out.attentions, "target", "target"),
        ("encoder", "encoder self-attention", out.encoder_attentions, "source", "source"),
    ):
        picked = _select_layers(len(attentions), layers)
        full = _weights_of(attentions, list(range(len(attentions))), None)
        n_rows, n_keys = full.shape[2:]
        rows = _page_rows(n_rows, n_heads * len(picked) * n_keys, [])
        if note := _rows_note(len(rows), n_rows):
            notes.append(f"{label}: {note}")
        rollout = attention_rollout(full) if name != "cross" else None
        views.append(_view(name, label, full[picked][:, :, rows], rows, queries, keys, picked, rollout))
    return views


def _lens(model: torch.nn.Module, hidden: tuple[torch.Tensor, ...], decode: Callable[[int], str], top_k: int) -> dict:
    """The logit lens table: each layer's top-k next tokens at the last LENS_POSITIONS positions."""
    T = hidden[0].shape[1]
    start = max(0, T - LENS_POSITIONS)
    lens = lens_of_hidden_states(model, hidden, top_k=top_k, last_positions=T - start)
    token_ids, probs = lens.token_ids[0], lens.probs[0]  # [L, P, k]
    return {
        "positions": list(range(start, T)),
        "tokens": [[[decode(i) for i in pos] for pos in layer] for layer in token_ids.tolist()],
        "probs": [[[round(p, 3) for p in pos] for pos in layer] for layer in probs.tolist()],
    }


@torch.no_grad()
def write_attention_explorer(
    model: torch.nn.Module,
    path: str | os.PathLike,
    input_ids: torch.Tensor,
    tokens: Sequence[str],
    target_ids: torch.Tensor | None = None,
    target_tokens: Sequence[str] | None = None,
    image: np.ndarray | None = None,
    layers: Sequence[int] | None = None,
    rows: Sequence[int] = (),
    decode: Callable[[int], str] | None = None,
    title: str = "",
    top_k: int = 5,
) -> ExplorerPage:
    """Write the explorer page for one input and return what was written.

    input_ids: [1, T] with `tokens` their labels; an encoder-decoder's source, its decoder tokens in
    target_ids [1, T'] (labels target_tokens); a ViT (or CLIP's vision tower): pixels [1, C, H, W]
    with `image` [h, w, 3] in [0, 1] as the model saw it (tokens: ignored). layers: which layers'
    maps to ship (default all); rows: query positions to keep when the page is capped; decode:
    token id -> text, for the logit lens of a decoder (omit it to leave the lens out).
    """
    path = check_output_path(path)
    notes: list[str] = []
    cfg = model.config
    data: dict = {"title": title, "notes": notes, "sequences": {}, "views": [], "lens": None, "image": None}
    if getattr(model, "is_encoder_decoder", False):
        if target_ids is None or target_tokens is None:
            raise UsageError("an encoder-decoder's explorer needs the decoder's tokens: give target_ids and labels")
        if rows:
            raise UsageError("rows keep some rows of a long single-stack prompt; an encoder-decoder's page has all")
        data["sequences"] = {"source": list(tokens), "target": list(target_tokens)}
        data["views"] = _seq2seq_views(model, input_ids, target_ids, layers, notes)
    elif not hasattr(model, "blocks"):
        raise UsageError(
            f"{type(model).__name__} has no single transformer stack to explore (CLIP: pass its vision tower, "
            "model.vision, with an image)"
        )
    elif getattr(cfg, "family", None) == "vit":
        if image is None:
            raise UsageError("a ViT's explorer lays the patches over the image: give image [h, w, 3] in [0, 1]")
        grid = (input_ids.shape[2] // cfg.patch_size, input_ids.shape[3] // cfg.patch_size)
        data["sequences"] = {"input": ["[CLS]"] + [f"patch {r},{c}" for r in range(grid[0]) for c in range(grid[1])]}
        data["image"] = {"src": _image_data_uri(image), "grid": list(grid)}
        data["views"] = [_single_stack_view(model, input_ids, layers, rows, notes)[0]]
    else:
        if target_ids is not None:
            raise UsageError("target_ids are an encoder-decoder's decoder tokens; this model takes input_ids alone")
        if len(tokens) != input_ids.shape[1]:
            raise UsageError(f"got {len(tokens)} token labels for {input_ids.shape[1]} tokens")
        data["sequences"] = {"input": list(tokens)}
        lens = decode is not None and cfg.family == "decoder"
        view, hidden = _single_stack_view(model, input_ids, layers, rows, notes, hidden_states=lens)
        data["views"] = [view]
        if lens:
            data["lens"] = _lens(model, hidden, decode, top_k)
            if input_ids.shape[1] > LENS_POSITIONS:
                notes.append(f"logit lens: the last {LENS_POSITIONS} of {input_ids.shape[1]} positions")
    html = render_page(data)
    atomic_write_text(path, html)
    return ExplorerPage(path=path, size=len(html.encode("utf-8")), notes=notes)


def render_page(data: dict) -> str:
    """The page's template with `data` inlined as JSON (</ escaped so no string closes the script)."""
    template = resources.files("qkv.viz").joinpath("explorer.html").read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    if _DATA_MARK not in template:
        raise RuntimeError("explorer.html lost its data mark; the page cannot be built")
    return template.replace(_DATA_MARK, payload)
