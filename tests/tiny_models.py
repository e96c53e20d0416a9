"""Tiny random qkv models, and random token ids to feed them.

The Hugging Face oracle models (the same weights in transformers and in qkv) are in oracle.py.
"""

from __future__ import annotations

import torch

from qkv import DecoderLM, ModelConfig


def tiny_model(preset: str, seed: int = 0, **overrides) -> DecoderLM:
    """`DecoderLM(ModelConfig.from_name(preset, **overrides))` in eval mode, initialised after
    `torch.manual_seed(seed)` (so the global RNG is left in a known state too)."""
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig.from_name(preset, **overrides)).eval()


def random_ids(vocab: int, batch: int, length: int, *, seed: int, low: int = 3) -> torch.Tensor:
    """[batch, length] token ids drawn uniformly from [low, vocab) by a generator of their own.

    The global RNG is not touched. `low=3` keeps clear of the special ids (0-2) of the oracle
    configs; pass `low=0` for the whole vocabulary.
    """
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
