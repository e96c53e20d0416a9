"""Autoregressive generation: logits processors, samplers and the decode loop.

Processors are small pure functions `(logits, input_ids) -> logits` composed in a list; the
decode loop is `prefill` + repeated `decode_one_token`, shared by every decoding rule.
"""

from qkv.generation.decode import decode_one_token, generate, prefill
from qkv.generation.processors import (
    LogitsProcessor,
    build_processors,
    min_p_filter,
    repetition_penalty,
    temperature_scale,
    top_k_filter,
    top_p_filter,
)
from qkv.generation.sampling import sample_next_token

__all__ = [
    "LogitsProcessor",
    "build_processors",
    "decode_one_token",
    "generate",
    "min_p_filter",
    "prefill",
    "repetition_penalty",
    "sample_next_token",
    "temperature_scale",
    "top_k_filter",
    "top_p_filter",
]
