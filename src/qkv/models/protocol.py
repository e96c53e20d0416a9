"""What generation needs of a model, written down once: `GenerativeModel`.

`qkv.generation` reaches models only through this protocol, so a new family that meets it
decodes with every decoding path (greedy, sampling, beam search, speculative, compiled steps).
Encoder-decoders meet `GenerativeEncoderDecoder` as well.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from qkv.cache import KVCache
from qkv.config import ModelConfig


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

    def decode(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, V] for the generating side's tokens [B, T] after what the cache holds;
        advances a dynamic cache by T (a static one is written at `input_pos`)."""
        ...


class GenerativeEncoderDecoder(GenerativeModel, Protocol):
    """An encoder-decoder also encodes the prompt into the cache and names the decoder's first token.

    Generation tells the two apart by `is_encoder_decoder`: for these, the prompt is the encoder
    input and the sequence being continued starts at `decoder_start_ids`.
    """

    is_encoder_decoder: bool

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None):
        """Run the encoder over the prompt [B, S]; with a cache, keep its output for cross-attention."""
        ...

    def decoder_start_ids(self, batch_size: int) -> torch.Tensor:
        """[B, 1] decoder_start_token_id."""
        ...
