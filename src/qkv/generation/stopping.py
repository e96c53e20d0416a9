"""Stop strings: matched on the decoded generated text, across token boundaries.

`find_stop` is the one matcher; `StopStrings` applies it to token ids (for `generate` and beam
search, which return ids), and `qkv.generation.text.TextStream` applies it while streaming text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in text[start:], or None."""
    hits = [(i, s) for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


class StopStrings:
    """Which rows' generated tokens, decoded, contain a stop string.

    tokenizer: anything with `decode(ids, skip_special_tokens=...)`. The text is decoded as the
    text layer shows it (special tokens skipped), so ids and text stop at the same token.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise ValueError(
                "stop strings are matched on decoded text, so they need a tokenizer: load the model with one "
                "(model.tokenizer) or pass token ids to stop at as eos_token_id"
            )
        self.tokenizer = tokenizer
        self.stops = list(stops)

    def matches(self, generated: Sequence[int]) -> bool:
        """True when the decoded text of `generated` contains a stop string."""
        text = self.tokenizer.decode(list(generated), skip_special_tokens=True)
        return find_stop(text, self.stops) is not None

    def hits(self, generated: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """generated: [B, n] tokens after the prompt; rows: [B] bool, the rows to check -> [B] bool."""
        out = torch.zeros_like(rows)
        for i in rows.nonzero().flatten().tolist():
            out[i] = self.matches(generated[i].tolist())
        return out
