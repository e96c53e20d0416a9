"""Autoregressive generation: one options dataclass, logits processors, samplers and decode loops.

Every entry point takes a `GenerationConfig` (keywords are a shorthand that builds one).
Processors are small pure functions `(logits, input_ids) -> logits` composed in a list; the
decode loop is `prefill` + repeated `decode_one_token`, shared by every decoding rule. Models are
reached only through `qkv.models.protocol.GenerativeModel`.
"""

from qkv.generation.api import generate
from qkv.generation.beam import ban_repeated_ngrams, beam_search
from qkv.generation.constrained import JSON_OBJECT, JsonSchemaProcessor, response_format_schema
from qkv.generation.context import RopeScaling, scale_rope
from qkv.generation.decode import context_budget, decode_one_token, decode_steps, prefill
from qkv.generation.options import GenerationConfig
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
from qkv.generation.speculative import SpeculativeStats, speculative_generate
from qkv.generation.static_step import StaticStep
from qkv.generation.stopping import StopStrings
from qkv.generation.text import Completion, TextStream, complete, stream, stream_completion

__all__ = [
    "JSON_OBJECT",
    "Completion",
    "GenerationConfig",
    "JsonSchemaProcessor",
    "LogitsProcessor",
    "RopeScaling",
    "SpeculativeStats",
    "StaticStep",
    "StopStrings",
    "TextStream",
    "ban_repeated_ngrams",
    "beam_search",
    "build_processors",
    "complete",
    "context_budget",
    "decode_one_token",
    "decode_steps",
    "generate",
    "min_p_filter",
    "prefill",
    "repetition_penalty",
    "response_format_schema",
    "sample_next_token",
    "scale_rope",
    "speculative_generate",
    "stream",
    "stream_completion",
    "temperature_scale",
    "top_k_filter",
    "top_p_filter",
]
