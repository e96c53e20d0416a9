"""Autoregressive generation: logits processors, samplers and the decode loop.

Processors are small pure functions `(logits, input_ids) -> logits` composed in a list; the
decode loop is `prefill` + repeated `decode_one_token`, shared by every decoding rule.
"""

from qkv.generation.beam import ban_repeated_ngrams, beam_search
from qkv.generation.decode import decode_one_token, decode_steps, generate, prefill
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
from qkv.generation.speculative import SpeculativeStats, early_exit_draft, speculative_generate
from qkv.generation.text import Completion, TextStream, complete, stream, stream_completion

__all__ = [
    "Completion",
    "LogitsProcessor",
    "SpeculativeStats",
    "TextStream",
    "ban_repeated_ngrams",
    "beam_search",
    "build_processors",
    "complete",
    "decode_one_token",
    "decode_steps",
    "early_exit_draft",
    "generate",
    "min_p_filter",
    "prefill",
    "repetition_penalty",
    "sample_next_token",
    "speculative_generate",
    "stream",
    "stream_completion",
    "temperature_scale",
    "top_k_filter",
    "top_p_filter",
]
