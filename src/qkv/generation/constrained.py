"""Constrained decoding: output that parses as JSON and validates against a JSON Schema.

`generate(..., json_schema=SCHEMA)` masks, at every step and for every row, the tokens that
cannot continue a document the schema accepts. The grammar engine is llguidance (guidance-ai's,
on PyPI as `llguidance`; one of vLLM's structured-output backends): it compiles the schema to a
grammar and computes each step's token mask from a trie over the vocabulary's bytes. This
module gives it qkv's tokenizer as bytes (`token_bytes`) and wraps it as a logits processor
(`JsonSchemaProcessor`), so it composes with the penalties and sampling filters of
`qkv.generation.processors` and with every path `decode_steps` takes (eager, left-padded,
compiled: the mask is applied to the logits outside the model's step).

    >>> generate(model, ids, json_schema={"type": "object"})          # any JSON object
    >>> generate(model, ids, json_schema={"type": "object", "properties": {"age": {"type": "integer"}},
    ...                                   "required": ["age"]})

Generation ends through the grammar: once the document is complete, only EOS is allowed, so a
row stops there instead of spending its remaining tokens. A row that runs out of max_new_tokens
first ends with an incomplete document (`Completion.finish_reason == "length"`, as OpenAI's).
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qkv.errors import GenerationOptionError

JSON_OBJECT: dict[str, Any] = {"type": "object"}  # any JSON object: OpenAI's response_format json_object

# How the schema is turned into a grammar: one space after ',' and ':' and no other whitespace.
# Flexible whitespace lets a small model fill its budget with newlines instead of closing the
# document; the fixed separators read like Python's json.dumps. A schema's "x-guidance" object
# may override them (llguidance's JsonCompileOptions).
COMPILE_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

INSTALL_HINT = "pip install llguidance (or pip install 'qkv[json]')"


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise GenerationOptionError(f"json_schema needs the grammar engine llguidance: {INSTALL_HINT}") from None
    return llguidance


# -- the schema -----------------------------------------------------------------------------------
def check_json_schema(schema: Any) -> dict[str, Any]:
    """The schema as a dict (a copy), after checking that it is one the grammar engine can decode.

    schema: a dict, or its JSON text. GenerationOptionError names what is wrong: not JSON, not an
    object, or rejected by the engine (unknown type, malformed keyword, bad regex, dangling $ref,
    unsupported keyword).
    """
    if isinstance(schema, bool):
        raise GenerationOptionError(
            f"json_schema={schema!r} is ambiguous: pass {{'type': 'object'}} for any JSON object "
            "(OpenAI's json_object) or {} for any JSON value"
        )
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GenerationOptionError(f"json_schema is not valid JSON text: {exc}") from None
    if not isinstance(schema, Mapping):
        raise GenerationOptionError(
            f"json_schema must be a JSON Schema object (a dict or its JSON text), got {type(schema).__name__}"
        )
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise GenerationOptionError(f"json_schema is not JSON-serializable: {exc}") from None
    _grammar(text)
    return json.loads(text)


@functools.lru_cache(maxsize=64)
def _grammar(schema_text: str) -> str:
    """llguidance's grammar for a schema's JSON text (whose property order the output follows), checked."""
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema_text, defaults=COMPILE_OPTIONS)
    except ValueError as exc:
        raise GenerationOptionError(f"json_schema is invalid: {exc}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GenerationOptionError(f"json_schema is invalid or unsupported: {'; '.join(messages)}")
    return grammar


def response_format_schema(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The json_schema option for OpenAI's `response_format`: {"type": "text"} -> None,
    {"type": "json_object"} -> JSON_OBJECT, {"type": "json_schema", "json_schema": {"schema": S}} -> S."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(JSON_OBJECT)
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        if not isinstance(inner, Mapping) or "schema" not in inner:
            raise GenerationOptionError('response_format json_schema needs {"json_schema": {"schema": {...}}}')
        return check_json_schema(inner["schema"])
    raise GenerationOptionError(f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'")


# -- the vocabulary as bytes ---------------------------------------------------------------------
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPECIAL_MARKER = b"\xff"  # llguidance's prefix for a special token (never a byte of UTF-8 text)


def _decoder_steps(engine: Any) -> list[dict[str, Any]]:
    """The engine's decoder as a flat list of its steps' settings (a Sequence is unrolled)."""
    if engine.decoder is None:
        return []
    state = json.loads(engine.decoder.__getstate__())
    steps = state.get("decoders", [state]) if state.get("type") == "Sequence" else [state]
    return steps


def vocabulary_kind(tokenizer: Any) -> str:
    """How the vocabulary spells bytes: "byte_level" (GPT-2's alphabet, `qkv.tokenizer.byte_level`)
    or "sentencepiece" (▁ for a space, <0xNN> byte-fallback tokens). Anything else (WordPiece's
    ##, a decoder qkv does not know) is a GenerationOptionError: its tokens' bytes are not defined."""
    types = {step.get("type") for step in _decoder_steps(tokenizer.engine)}
    if "ByteLevel" in types:
        return "byte_level"
    if types & {"Metaspace", "ByteFallback"} or any(
        step.get("type") == "Replace" and step.get("pattern", {}).get("String") == "▁"
        for step in _decoder_steps(tokenizer.engine)
    ):
        return "sentencepiece"
    raise GenerationOptionError(
        f"json_schema needs a byte-level BPE or SentencePiece vocabulary; this tokenizer's decoder is "
        f"{sorted(t for t in types if t) or 'none'}, whose tokens have no defined bytes"
    )


def token_bytes(tokenizer: Any) -> list[bytes]:
    """The bytes each token id stands for, id by id ([b""] for an id the vocabulary skips).

    Byte-level BPE maps each character back through GPT-2's alphabet (a token with a character
    outside it is its own UTF-8, as the `tokenizers` ByteLevel decoder does); SentencePiece turns ▁
    into a space and <0xNN> into the byte 0xNN. Special tokens are their text after llguidance's
    marker byte 0xFF, so the grammar never matches them as text. (qkv's Tokenizer has no id ->
    bytes method; this is it, for the grammar engine.)
    """
    from qkv.tokenizer.byte_level import ALPHABET, BYTE_TO_CHAR

    kind = vocabulary_kind(tokenizer)
    engine = tokenizer.engine
    out = [b""] * tokenizer.vocab_size
    special = {i for i, t in engine.get_added_tokens_decoder().items() if t.special}
    if kind == "byte_level":
        # Each alphabet character back to the Latin-1 character of its byte: one C-level pass per token.
        back = str.maketrans({c: chr(b) for b, c in BYTE_TO_CHAR.items()})
        for token, i in engine.get_vocab(with_added_tokens=True).items():
            if ALPHABET.issuperset(token):
                out[i] = token.translate(back).encode("latin-1")
            else:  # not spelled in the alphabet (an added token's plain text): the text itself
                out[i] = token.encode("utf-8")
    else:
        fallback = any(step.get("type") == "ByteFallback" for step in _decoder_steps(engine))
        for token, i in engine.get_vocab(with_added_tokens=True).items():
            byte = _BYTE_TOKEN.fullmatch(token) if fallback else None
            out[i] = bytes([int(byte.group(1), 16)]) if byte else token.replace("▁", " ").encode("utf-8")
    for i in special:
        out[i] = SPECIAL_MARKER + engine.id_to_token(i).encode("utf-8")
    return out


class _Wrapped:
    """What llguidance's TokenizerWrapper reads: tokens as bytes, EOS/BOS, special ids, and encode."""

    def __init__(self, tokenizer: Any, eos: Sequence[int], n_vocab: int) -> None:
        self.tokens = token_bytes(tokenizer) + [b""] * (n_vocab - tokenizer.vocab_size)
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = [i for i, t in tokenizer.engine.get_added_tokens_decoder().items() if t.special]
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", "replace"), add_special_tokens=False, allowed_special=())


def check_tokenizer(tokenizer: Any, eos: Sequence[int]) -> None:
    """Refuse, before any token is generated, what the grammar cannot decode with: no qkv
    Tokenizer, a vocabulary without defined bytes (`vocabulary_kind`), no EOS id to end on."""
    if tokenizer is None or not hasattr(tokenizer, "engine"):
        raise GenerationOptionError(
            "json_schema needs the model's qkv Tokenizer (model.tokenizer, or qkv.load_tokenizer(...)), "
            f"got {type(tokenizer).__name__}"
        )
    vocabulary_kind(tokenizer)
    if not eos:
        raise GenerationOptionError(
            "json_schema ends each row with an EOS token once the document is complete, and none is known; "
            "pass eos_token_id="
        )


_GRAMMAR_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer: Any, eos: Sequence[int], n_vocab: int) -> Any:
    """llguidance's LLTokenizer for a qkv tokenizer, EOS ids and logits width (cached per tokenizer:
    building it reads the whole vocabulary, ~0.2 s for SmolLM2's 49k tokens)."""
    llg = _llguidance()
    check_tokenizer(tokenizer, eos)
    if tokenizer.vocab_size > n_vocab:
        raise GenerationOptionError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's logits only {n_vocab}"
        )
    per_tokenizer = _GRAMMAR_TOKENIZERS.setdefault(tokenizer, {})
    key = (tuple(eos), n_vocab)
    if key not in per_tokenizer:
        wrapped = llg.TokenizerWrapper(_Wrapped(tokenizer, eos, n_vocab))
        per_tokenizer[key] = llg.LLTokenizer(wrapped, n_vocab=n_vocab, eos_token=list(eos))
    return per_tokenizer[key]


# -- the processor -------------------------------------------------------------------------------
class JsonSchemaProcessor:
    """A logits processor `(logits [B, V], input_ids [B, T]) -> logits` that allows, in each row,
    only the tokens that continue a document valid under `schema` (and EOS once it is complete).

    It keeps one grammar matcher per row, so it serves one generation: the first call fixes the
    batch and where the generated tokens start (input_ids' length then); each later call feeds
    every row's matcher the token chosen since, then computes each row's mask (in llguidance's
    native code, from a trie over the vocabulary: ~0.1 ms for SmolLM2's 49k tokens) and applies
    the batch's masks at once. Rows the loop has finished (EOS, a stop string) are left alone:
    their next tokens are padding.
    """

    def __init__(self, schema: Any, tokenizer: Any, eos: Sequence[int]) -> None:
        self.grammar = _grammar(json.dumps(check_json_schema(schema)))
        check_tokenizer(tokenizer, eos)
        self.tokenizer = tokenizer
        self.eos = tuple(eos)
        self.matchers: list[Any] = []
        self.active: list[bool] = []
        self.start = 0  # input_ids' length at the first call: where the generated tokens begin
        self.fed = 0  # generated tokens each matcher has been fed
        self.bitmask: torch.Tensor | None = None

    def _start(self, batch_size: int, n_vocab: int, length: int) -> None:
        llg = _llguidance()
        lltok = grammar_tokenizer(self.tokenizer, self.eos, n_vocab)
        first = llg.LLMatcher(lltok, self.grammar, log_level=0)
        if first.is_error():  # e.g. a grammar past llguidance's size limits for this vocabulary
            raise GenerationOptionError(f"json_schema: the grammar engine refused the schema: {first.get_error()}")
        self.matchers = [first, *(first.deep_copy() for _ in range(batch_size - 1))]  # a copy: ~10 us
        self.active = [True] * batch_size
        self.start = length
        self.bitmask = torch.full((batch_size, (n_vocab + 31) // 32), -1, dtype=torch.int32)

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        B, V = logits.shape
        if self.bitmask is None:
            self._start(B, V, input_ids.shape[1])
        elif len(self.matchers) != B or input_ids.shape[1] < self.start + self.fed:
            raise GenerationOptionError(
                "a JsonSchemaProcessor serves one generation; build a new one for each generate() call"
            )
        self._feed(input_ids)
        rows = [(m, i) for i, m in enumerate(self.matchers) if self.active[i]]
        if not rows:
            return logits
        bitmask = self.bitmask
        bitmask.fill_(-1)  # inactive rows: everything allowed (their token is replaced by padding)
        # Row by row in this thread. llguidance's LLExecutor spreads rows over its own threads, but
        # handing them over costs more than it saves where torch already uses the cores: on 2 cores,
        # SmolLM2 with 16 rows spent 3.5 ms a step in it against 1.5 ms here (benchmarks/json_schema.py).
        for matcher, i in rows:
            matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), bitmask.shape[1] * 4)
            if matcher.is_error():
                raise GenerationOptionError(f"json_schema: the grammar engine failed on row {i}: {matcher.get_error()}")
        # Bit j of word w allows token 32 w + j: the little-endian bytes' bits, unpacked in token order
        # (numpy's unpackbits: cheaper on the CPU than shifting the words with torch ops).
        banned = np.unpackbits((~bitmask).numpy().view(np.uint8), axis=-1, bitorder="little")[:, :V]
        return logits.masked_fill(torch.from_numpy(banned.view(np.bool_)).to(logits.device), float("-inf"))

    def _feed(self, input_ids: torch.Tensor) -> None:
        """Give each active row's matcher the tokens generated since the last call."""
        new = input_ids[:, self.start + self.fed :].tolist()
        for i, tokens in enumerate(new):
            for token in tokens:
                if not self.active[i]:
                    break
                # The mask allowed only tokens the matcher accepts, so a refused token is the pad a
                # finished row receives (a stop string ended it); an EOS ends the row.
                if token in self.eos or not self.matchers[i].consume_token(token):
                    self.active[i] = False
        self.fed += len(new[0]) if new else 0
