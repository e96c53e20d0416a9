"""Semantic search over a folder of text files, and cosine similarity between embeddings.

corpus = read_corpus("notes/")                       # every non-blank line of *.md, *.txt, ...
hits = search(model, model.tokenizer, ["when is the dentist?"], corpus, top_k=3)
for score, passage in hits[0]:
    print(f"{score:.3f} {passage.where}  {passage.text}")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qkv.embedding.encode import embed
from qkv.errors import UsageError

if TYPE_CHECKING:
    from qkv.tokenizer import Tokenizer

# Plain-text note and documentation formats; other kinds are opted into with `suffixes`.
DEFAULT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".org", ".tex", ".adoc", ".text")

# Bytes read to tell a binary file (a NUL byte among them, as git and grep decide) from text.
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Passage:
    """A piece of the corpus: one line of a file (``line`` counts from 1) or a whole file (``line`` None)."""

    path: Path
    line: int | None
    text: str

    @property
    def where(self) -> str:
        return str(self.path) if self.line is None else f"{self.path}:{self.line}"


@dataclass
class Corpus:
    """The passages read from a folder, and the files passed over with the reason for each."""

    passages: list[Passage] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.passages]


def read_corpus(
    folder: str | os.PathLike, by: str = "line", suffixes: Sequence[str] | None = DEFAULT_SUFFIXES
) -> Corpus:
    """The passages of the text files under `folder` (recursively, hidden files and folders left
    out, in path order).

    by="line": each line that has a letter or digit (blank lines, rules and fences are not worth
    ranking); by="file": each non-empty file as one passage (a model reads only its first
    ``max_seq_length`` tokens). suffixes: the file endings to read (case-insensitive; None: every
    file). Binary files and files that are not UTF-8 are skipped and listed in ``Corpus.skipped``.
    UsageError when `folder` is not a directory.
    """
    if by not in ("line", "file"):
        raise UsageError(f"by={by!r}: choose 'line' or 'file'")
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"corpus folder {root} {'is not a directory' if root.exists() else 'does not exist'}")
    wanted = None if suffixes is None else {s.lower() if s.startswith(".") else f".{s.lower()}" for s in suffixes}
    corpus = Corpus()
    for path in _files(root):
        if wanted is not None and path.suffix.lower() not in wanted:
            continue
        text, why = _read_text(path)
        if text is None:
            corpus.skipped.append((path, why))
        elif by == "file":
            if text.strip():
                corpus.passages.append(Passage(path, None, text.strip()))
        else:
            for number, line in enumerate(text.splitlines(), start=1):
                line = line.strip()
                if any(c.isalnum() for c in line):
                    corpus.passages.append(Passage(path, number, line))
    return corpus


def _files(root: Path) -> list[Path]:
    """Every regular file under `root`, without following links to folders (no cycles)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / name for name in sorted(files) if not name.startswith("."))
    return sorted(path for path in found if path.is_file())


def _read_text(path: Path) -> tuple[str | None, str]:
    """(text, "") or (None, why it cannot be read as text)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    if b"\0" in data[:_SNIFF_BYTES]:
        return None, "binary"
    try:
        return data.decode("utf-8-sig"), ""
    except UnicodeDecodeError:
        return None, "not UTF-8"


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of every row of a [N, D] with every row of b [M, D] (default: a) -> [N, M]."""
    a = F.normalize(a.float(), dim=-1)
    b = a if b is None else F.normalize(b.float(), dim=-1)
    return a @ b.T


def rank(queries: torch.Tensor, passages: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` passages [N, D] closest to each query [Q, D] by cosine -> (scores, indices),
    each [Q, min(top_k, N)], best first."""
    if top_k < 1:
        raise UsageError(f"top_k={top_k} must be >= 1")
    scores = cosine_matrix(queries, passages)
    return scores.topk(min(top_k, scores.shape[1]), dim=1)


def search(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    queries: Sequence[str],
    corpus: Corpus,
    top_k: int = 5,
    *,
    progress: bool | None = None,
    **options: Any,
) -> list[list[tuple[float, Passage]]]:
    """For each query, the `top_k` passages of `corpus` closest in meaning, as (cosine, passage),
    best first. `options` go to `embed` (batch_size, pooling, ...); progress is shown while the
    corpus is embedded. UsageError when the corpus has no passages."""
    if not corpus.passages:
        raise UsageError("the corpus has no text to search")
    passages = embed(model, tokenizer, corpus.texts, progress=progress, **options)
    asked = embed(model, tokenizer, queries, progress=False, **options)
    scores, indices = rank(asked, passages, top_k)
    return [
        [(float(s), corpus.passages[int(i)]) for s, i in zip(row_scores, row_indices)]
        for row_scores, row_indices in zip(scores, indices)
    ]
