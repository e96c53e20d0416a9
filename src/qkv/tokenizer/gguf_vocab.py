"""The vocabulary stored in a GGUF file's metadata, as a Hugging Face `tokenizers` engine.

GGUF (llama.cpp) keeps no tokenizer.json; it stores the vocabulary under ``tokenizer.ggml.*``:
``model`` (``gpt2`` or ``llama``), ``tokens``, ``scores``, ``token_type``, ``merges``, ``pre``,
``bos_token_id``/``eos_token_id``/``padding_token_id``/``unknown_token_id``, ``add_bos_token``,
``add_eos_token``, ``add_space_prefix``, and ``tokenizer.chat_template``. Both models are rebuilt to
tokenize as llama.cpp does (``src/llama-vocab.cpp``):

- ``gpt2``: byte-level BPE with the stored merges, pre-tokenized by the regex ``pre`` names.
- ``llama``: SentencePiece BPE. llama.cpp joins the adjacent pair whose join is the token with the
  highest score, so every cut of a token into two tokens is a merge, ranked by score
  (:mod:`qkv.tokenizer.merges`, which also bounds the token lengths and the work). Characters
  no token covers fall back to ``<0xNN>`` byte tokens. Spaces are ``▁`` and every run of text gets a
  leading ``▁`` (llama.cpp adds it at the start and after each special token, as SentencePiece's
  ``add_dummy_prefix``).

The checkpoint loader reuses :func:`tokenizer_from_gguf_fields` with the fields it has read.
"""

from __future__ import annotations

import bisect
import itertools
import numbers
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Engine
from tokenizers.models import BPE

from qkv.errors import CheckpointError, TokenizerError
from qkv.formats.gguf import read_gguf
from qkv.tokenizer.base import Tokenizer
from qkv.tokenizer.byte_level import ALPHABET, bytes_to_piece
from qkv.tokenizer.merges import check_token_lengths, merges_from_vocab
from qkv.tokenizer.tiktoken_format import ENCODINGS

# gguf.TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_OUTSIDE_ALPHABET = re.compile("[^" + "".join(map(re.escape, sorted(ALPHABET))) + "]")


@dataclass(frozen=True)
class PreTokenization:
    """How a ``gpt2``-model vocabulary splits text before BPE (llama.cpp ``llama_vocab_pre_type``)."""

    build: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False  # a pre-token that is a whole token is taken as is (LLaMA 3)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


def _split_then_bytes(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 is LLaMA 3's regex with single digits.
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2 = PreTokenization(lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
_DIGITS_THEN_GPT2 = PreTokenization(
    lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
)
_LLAMA3_PRE = PreTokenization(_split_then_bytes(_LLAMA3), ignore_merges=True, add_bos=True)
_QWEN2_PRE = PreTokenization(_split_then_bytes(_QWEN2))
_GPT4O_PRE = PreTokenization(_split_then_bytes(ENCODINGS["o200k_base"].pattern))

# `tokenizer.ggml.pre` -> pre-tokenization, after llama.cpp's table (src/llama-vocab.cpp).
PRE_TOKENIZATIONS: dict[str, PreTokenization] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3_PRE),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_PRE),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), _DIGITS_THEN_GPT2
    ),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_PRE),
}


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a GGUF file as Python values; TokenizerError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"GGUF file {path} does not exist")
    try:
        metadata = read_gguf(path).metadata  # qkv's validating reader: header only, no tensor data
    except CheckpointError as exc:
        raise TokenizerError(f"GGUF file {path} could not be read: {exc}") from None
    return {key: value for key, value in metadata.items() if key.startswith("tokenizer.")}


def load_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer stored in the GGUF file at ``path``."""
    return tokenizer_from_gguf_fields(read_gguf_metadata(path), source=str(path))


def tokenizer_from_gguf_fields(fields: Mapping[str, Any], source: str = "GGUF metadata") -> Tokenizer:
    """A Tokenizer from GGUF metadata: ``{"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens":
    [...], ...}`` (values as ``gguf.ReaderField.contents()`` returns them). ``source`` names the
    file in error messages."""
    fields = _Fields(fields, source)
    model = fields.get("tokenizer.ggml.model", str)
    if model is None:
        raise TokenizerError(f"{source} holds no tokenizer vocabulary (no tokenizer.ggml.model key)")
    tokens = fields.require("tokenizer.ggml.tokens", list)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens must be a non-empty list of strings")
    check_token_lengths(tokens, f"{source}: tokenizer.ggml.tokens")
    types = fields.get("tokenizer.ggml.token_type", list) or [NORMAL] * len(tokens)
    fields.check_length("tokenizer.ggml.token_type", types, len(tokens))

    if model == "gpt2":
        engine, add_bos_default = _byte_level_bpe(fields, tokens, types)
    elif model == "llama":
        engine, add_bos_default = _sentencepiece_bpe(fields, tokens, types), True
    else:
        raise TokenizerError(f"{source}: tokenizer.ggml.model {model!r} is not supported (supported: gpt2, llama)")

    engine.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    )
    engine.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    )

    roles = {}
    for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")):
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id", int)
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise TokenizerError(
                    f"{source}: tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary of {len(tokens)}"
                )
            roles[role] = tokens[token_id]

    add_bos = fields.get("tokenizer.ggml.add_bos_token", bool)
    add_eos = fields.get("tokenizer.ggml.add_eos_token", bool)
    processor = _bos_eos_processor(
        roles.get("bos_token") if (add_bos if add_bos is not None else add_bos_default) else None,
        roles.get("eos_token") if add_eos else None,
        engine,
    )
    if processor is not None:
        engine.post_processor = processor
    # Without repeated tokens the engine's model holds the ids 0 .. len(tokens) - 1, and the
    # special and user-defined tokens added above are among them.
    gapless = engine.get_vocab_size(with_added_tokens=False) == len(tokens)
    return Tokenizer(
        engine,
        special_tokens=roles,
        chat_template=fields.get("tokenizer.chat_template", str),
        source_format="gguf",
        gapless_size=len(tokens) if gapless else None,
    )


def _byte_level_bpe(fields: _Fields, tokens: list[str], types: list[int]) -> tuple[Engine, bool]:
    merges = fields.require("tokenizer.ggml.merges", list)
    vocab = _byte_level_vocab(tokens, types)
    pre = fields.get("tokenizer.ggml.pre", str) or "default"
    pre_tokenization = PRE_TOKENIZATIONS.get(pre)
    if pre_tokenization is None:
        warnings.warn(
            f"{fields.source}: pre-tokenizer {pre!r} is not known to qkv; splitting text as GPT-2 does, "
            "which may give different ids from llama.cpp",
            stacklevel=3,
        )
        pre_tokenization = _GPT2
    pairs = _split_merges(merges, vocab)
    if pairs is None:  # a merge is wrong (or "" is a token): one at a time, to say which
        _check_merges(fields, merges, vocab)
        pairs = [tuple(merge.split(" ")) for merge in merges]
    engine = Engine(BPE(vocab, pairs, fuse_unk=False, ignore_merges=pre_tokenization.ignore_merges))
    engine.pre_tokenizer = pre_tokenization.build()
    engine.decoder = decoders.ByteLevel()
    engine.post_processor = processors.ByteLevel(trim_offsets=False)
    return engine, pre_tokenization.add_bos


def _split_merges(merges: list, vocab: Mapping[str, int]) -> list[tuple[str, str]] | None:
    """Merges 'left right' as (left, right) pairs, checked all at once: each has two parts, and they
    and their join are tokens. None if one is not; `_check_merges` then says which."""
    try:
        pairs = [tuple(merge.split(" ")) for merge in merges]
    except (AttributeError, TypeError):  # not a string
        return None
    tokens = vocab.keys()
    if set(map(len, pairs)) != {2} or "" in tokens:  # "": an empty part would pass the membership checks
        return None
    parts, joins = set(itertools.chain.from_iterable(pairs)), map("".join, pairs)
    return pairs if tokens >= parts and all(map(tokens.__contains__, joins)) else None


def _check_merges(fields: _Fields, merges: list, vocab: Mapping[str, int]) -> None:
    """TokenizerError naming the first merge that is not 'left right' with left, right and left + right in `vocab`."""
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else ()
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{fields.source}: tokenizer.ggml.merges[{i}] is {merge!r}, expected 'left right'")
        left, right = parts
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise TokenizerError(
                f"{fields.source}: tokenizer.ggml.merges[{i}] {left + ' ' + right!r} joins tokens "
                "that are not in tokenizer.ggml.tokens"
            )


def _byte_level_vocab(tokens: list[str], types: list[int]) -> dict[str, int]:
    """token -> id. Normal tokens are spelled in GPT-2's byte alphabet; a few converters store some
    as plain text, which is respelled (as transformers' GGUF loader does). The tokens are searched
    for characters outside the alphabet all at once: a vocabulary has ~10^5 of them."""
    spelled = list(tokens)
    ends = list(itertools.accumulate(map(len, tokens)))
    outside = {bisect.bisect_right(ends, m.start()) for m in _OUTSIDE_ALPHABET.finditer("".join(tokens))}
    for i in outside:
        if types[i] == NORMAL:
            spelled[i] = bytes_to_piece(tokens[i].encode("utf-8"))
    return dict(zip(spelled, range(len(spelled))))


def _sentencepiece_bpe(fields: _Fields, tokens: list[str], types: list[int]) -> Engine:
    scores = fields.require("tokenizer.ggml.scores", list)
    fields.check_length("tokenizer.ggml.scores", scores, len(tokens))
    if not all(isinstance(s, numbers.Real) and not isinstance(s, bool) for s in scores):
        raise TokenizerError(f"{fields.source}: tokenizer.ggml.scores must be a list of numbers")
    vocab = {token: i for i, token in enumerate(tokens)}
    missing_bytes = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing_bytes and BYTE in types:
        raise TokenizerError(
            f"{fields.source}: byte tokens <0x{missing_bytes[0]:02X}> ... are missing from tokenizer.ggml.tokens"
        )
    merges = merges_from_vocab(vocab, fields.source, order=lambda token_id: (-scores[token_id], token_id))
    unk_id = fields.get("tokenizer.ggml.unknown_token_id", int)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    engine = Engine(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=not missing_bytes))
    add_prefix = fields.get("tokenizer.ggml.add_space_prefix", bool)
    add_prefix = True if add_prefix is None else add_prefix
    # A normaliser, not Metaspace: Metaspace does not add a second ▁ to text that starts with a
    # space, llama.cpp and SentencePiece do (" hi" -> "▁▁hi").
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    engine.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    engine.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *([decoders.Strip(" ", 1, 0)] if add_prefix else []),
        ]
    )
    return engine


def _bos_eos_processor(bos: str | None, eos: str | None, engine: Engine) -> processors.PostProcessor | None:
    """Adds ``bos`` before and ``eos`` after each sequence, as llama.cpp's add_bos/add_eos."""
    if bos is None and eos is None:
        return None

    def sequence(name: str, type_id: int) -> str:
        return " ".join(f"{part}:{type_id}" for part in (bos, name, eos) if part)

    specials = [(t, engine.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t]
    return processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=f"{sequence('$A', 0)} {sequence('$B', 1)}",
        special_tokens=specials,
    )


class _Fields:
    """GGUF metadata with typed look-ups whose errors name the file and the key."""

    def __init__(self, fields: Mapping[str, Any], source: str) -> None:
        self.fields, self.source = fields, source

    def get(self, key: str, kind: type) -> Any:
        value = self.fields.get(key)
        if value is None:
            return None
        if kind is list and (isinstance(value, tuple) or hasattr(value, "tolist")):
            value = list(value.tolist() if hasattr(value, "tolist") else value)  # numpy arrays from other readers
        if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TokenizerError(f"{self.source}: {key} is a {type(value).__name__}, expected {kind.__name__}")
        return value

    def require(self, key: str, kind: type) -> Any:
        value = self.get(key, kind)
        if value is None:
            raise TokenizerError(f"{self.source}: the vocabulary has no {key}")
        return value

    def check_length(self, key: str, values: Sequence, expected: int) -> None:
        if len(values) != expected:
            raise TokenizerError(
                f"{self.source}: {key} has {len(values)} entries but tokenizer.ggml.tokens has {expected}"
            )
