"""Choosing the next token from processed logits."""

from __future__ import annotations

import torch


def sample_next_token(
    logits: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False
) -> torch.Tensor:
    """logits: [B, V] -> next token ids [B]: argmax when greedy, else a draw from softmax(logits)."""
    if greedy:  # in float32: the same index (the cast is exact), and torch's argmax is ~5x faster there
        return logits.float().argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
