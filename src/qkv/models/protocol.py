"""What generation needs of a model, written down once: `GenerativeModel`.

`qkv.generation` reaches models only through this protocol, so a new family that meets it
decodes with every decoding path (greedy, sampling, beam search, speculative, compiled steps).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from qkv.cache import KVCache
from qkv.config import ModelConfig
from qkv.models.output import ModelOutput


@runtime_checkable
class GenerativeModel(Protocol):
    """A model that continues token sequences with a KV cache."""

    config: ModelConfig  # context_limit, eos_token_id, vocab_size
    tokenizer: Any  # for stop strings; None when the model carries none

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def new_cache(self, batch_size: int, max_len: int | None = None, static: bool = False) -> KVCache:
        """An empty cache; static=True is written at explicit slots (`input_pos`) for compiled steps."""
        ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Logits for input_ids [B, T] after what the cache holds; advances a dynamic cache by T."""
        ...
