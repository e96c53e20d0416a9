"""sentence-transformers as the reference for qkv's sentence embeddings (all-MiniLM-L6-v2).

Parity: every row's cosine with the reference >= 0.99999 and every element within 1e-5.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# sentence-transformers must read the local folder only, never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-5


def load_reference(path: Path):
    """sentence-transformers' SentenceTransformer on the model folder `path`, on the CPU."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(path), device="cpu")


def reference_embed(st, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """The reference's embeddings [N, D], float32 on the CPU."""
    return st.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float().cpu()


def parity(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (cosine with the reference, largest absolute difference)."""
    return F.cosine_similarity(ours, theirs, dim=-1), (ours - theirs).abs().amax(dim=-1)


def assert_same_embeddings(ours: torch.Tensor, theirs: torch.Tensor, texts: list[str] | None = None) -> None:
    """Every row within MIN_COSINE and MAX_ABS_DIFF of the reference, naming the rows that are not."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    cosine, diff = parity(ours, theirs)
    bad = [i for i in range(len(ours)) if cosine[i] < MIN_COSINE or diff[i] > MAX_ABS_DIFF]
    names = [f"{i} {text[:30]!r}" for i, text in enumerate(texts)] if texts else list(map(str, range(len(ours))))
    assert not bad, "rows off the reference: " + "; ".join(
        f"{names[i]}: cosine {cosine[i]:.7f}, max diff {diff[i]:.2e}" for i in bad
    )
