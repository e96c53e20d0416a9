"""Embedding files: texts in (one per line), vectors out as NumPy ``.npy`` (float32 [N, D]) or
JSON lines (``{"text", "embedding"}`` per row), written atomically (`qkv.atomic`): the file is
complete under its name, or absent."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from qkv.atomic import atomic_path, atomic_write_text
from qkv.errors import UsageError

FORMATS = (".npy", ".jsonl")


def read_lines(path: str | os.PathLike) -> list[str]:
    """The texts of a file with one text per line (``-``: standard input). Every line is a text,
    blank ones too, so row i of the embeddings is line i + 1. UsageError for a file that cannot be
    read as UTF-8 text or holds no lines."""
    name = "standard input" if str(path) == "-" else str(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise UsageError(f"{name} is empty: it needs one text per line")
    return lines


def json_lines(texts: Sequence[str], vectors: torch.Tensor) -> Iterator[str]:
    """One JSON object per row: ``{"text": ..., "embedding": [...]}``, floats at float32 precision."""
    rows = vectors.detach().float().cpu().numpy()
    for text, row in zip(texts, rows, strict=True):
        # str(np.float32) is the shortest text that reads back as the same float32.
        yield f'{{"text": {json.dumps(text, ensure_ascii=False)}, "embedding": [{", ".join(map(str, row))}]}}'


def check_output_path(path: str | os.PathLike) -> str:
    """The format of an embeddings file by its suffix (".npy" or ".jsonl"); UsageError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"cannot write embeddings to {path}: use a name ending in {' or '.join(FORMATS)}")
    return suffix


def save_embeddings(path: str | os.PathLike, vectors: torch.Tensor, texts: Sequence[str] | None = None) -> Path:
    """Write `vectors` [N, D] to `path`, by its suffix: ``.npy`` or ``.jsonl`` (which needs `texts`)."""
    path = Path(path)
    if check_output_path(path) == ".npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save adds .npy to a bare name
            np.save(f, vectors.detach().float().cpu().numpy())
        return path
    if texts is None:
        raise UsageError("a .jsonl file holds each text with its embedding; pass texts")
    atomic_write_text(path, "".join(line + "\n" for line in json_lines(texts, vectors)))
    return path
