"""tiktoken rank files (``cl100k_base.tiktoken``) as a Hugging Face `tokenizers` byte-level BPE.

A rank file has one ``<base64 token bytes> <rank>`` per line; the rank is both the token id and its
merge priority. tiktoken encodes a pre-token by repeatedly joining the adjacent pair whose join has
the lowest rank, and takes a pre-token that is itself a token whole. The same model in `tokenizers`
terms: the vocabulary spelled in GPT-2's byte alphabet; a merge ``(left, right)`` for every way of
cutting a token into two tokens, ordered by the token's rank (:mod:`qkv.tokenizer.merges`);
``ignore_merges`` for whole tokens.
Pre-tokenization is the encoding's regex in a Split pre-tokenizer (the tests check it matches
tiktoken on hard cases).

    >>> tok = tokenizer_from_tiktoken("cl100k_base.tiktoken")      # doctest: +SKIP
    >>> tok.encode("hello world")                                   # doctest: +SKIP
    [15339, 1917]
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as Engine
from tokenizers.models import BPE

from qkv.errors import TokenizerError
from qkv.tokenizer.base import Tokenizer
from qkv.tokenizer.byte_level import bytes_to_piece
from qkv.tokenizer.files import read_text
from qkv.tokenizer.merges import merges_from_vocab


@dataclass(frozen=True)
class TiktokenEncoding:
    """What a rank file does not hold: the pre-tokenization regex and the special tokens."""

    pattern: str
    special_tokens: Mapping[str, int]
    eos_token: str | None = "<|endoftext|>"


# tiktoken_ext/openai_public.py (tiktoken 0.9).
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_FIM = {"<|fim_prefix|>": 0, "<|fim_middle|>": 1, "<|fim_suffix|>": 2}

ENCODINGS: dict[str, TiktokenEncoding] = {
    "r50k_base": TiktokenEncoding(_R50K_PATTERN, {"<|endoftext|>": 50256}),
    "p50k_base": TiktokenEncoding(_R50K_PATTERN, {"<|endoftext|>": 50256}),
    "cl100k_base": TiktokenEncoding(
        _CL100K_PATTERN,
        {"<|endoftext|>": 100257, **{t: 100258 + i for t, i in _FIM.items()}, "<|endofprompt|>": 100276},
    ),
    "o200k_base": TiktokenEncoding(_O200K_PATTERN, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}


def to_oniguruma(pattern: str) -> str:
    """A tiktoken (Rust fancy-regex) pattern as the Oniguruma regex `tokenizers` runs.

    Possessive ``?+ *+ ++`` mean the same in both, but Oniguruma's Ruby syntax reads ``{1,3}+`` as
    "one or more runs of 1-3", so cl100k's ``\\p{N}{1,3}+`` would swallow every digit. Nothing can
    follow the bounded repeat inside its alternative, so plain ``{1,3}`` matches the same text.
    """
    return re.sub(r"(?<!\\)(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def read_ranks(path: Path) -> dict[bytes, int]:
    """The ``token bytes -> rank`` table of a rank file; TokenizerError names the bad line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(read_text(path, "tiktoken rank file").splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(
                f"tiktoken rank file {path} line {lineno}: expected '<base64 token> <rank>', got {line[:80]!r}"
            )
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError):
            raise TokenizerError(
                f"tiktoken rank file {path} line {lineno}: {parts[0][:40]!r} is not base64 "
                f"or {parts[1][:20]!r} is not an integer rank"
            ) from None
        if token in ranks:
            raise TokenizerError(f"tiktoken rank file {path} line {lineno}: token {token!r} appears twice")
        ranks[token] = rank
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"tiktoken rank file {path} lacks the single-byte tokens for {len(missing)} bytes "
            f"(first: 0x{missing[0]:02x}); a byte-level vocabulary needs all 256 (is the file truncated?)"
        )
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"tiktoken rank file {path} gives the same rank to two tokens")
    return ranks


def tokenizer_from_tiktoken(
    path: str | os.PathLike,
    encoding: str | None = None,
    *,
    pattern: str | None = None,
    special_tokens: Mapping[str, int] | None = None,
) -> Tokenizer:
    """A Tokenizer from a tiktoken rank file.

    ``encoding`` names the tiktoken encoding (default: the file's stem, e.g. ``cl100k_base``),
    which supplies the regex and the special tokens; ``pattern``/``special_tokens`` override them
    (for rank files of other models). Special tokens in text are not recognised unless allowed,
    as in tiktoken.
    """
    path = Path(path)
    name = encoding or path.stem
    known = ENCODINGS.get(name)
    if known is None and pattern is None:
        raise TokenizerError(
            f"{path}: unknown tiktoken encoding {name!r} (known: {', '.join(sorted(ENCODINGS))}); "
            "pass encoding= or pattern= and special_tokens="
        )
    pattern = pattern if pattern is not None else known.pattern
    special_tokens = dict(special_tokens if special_tokens is not None else known.special_tokens)
    ranks = read_ranks(path)

    vocab = {bytes_to_piece(token): rank for token, rank in ranks.items()}
    merges = [(bytes_to_piece(left), bytes_to_piece(right)) for left, right in merges_from_vocab(ranks, str(path))]
    taken = set(ranks.values())
    for token, token_id in special_tokens.items():
        if token_id in taken:
            raise TokenizerError(f"{path}: special token {token!r} has id {token_id}, which a ranked token has")
        vocab[token] = token_id  # in the model's vocabulary, so the added token keeps this exact id
    engine = Engine(BPE(vocab, merges, ignore_merges=True, fuse_unk=False))
    engine.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(to_oniguruma(pattern)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    engine.decoder = decoders.ByteLevel()
    engine.post_processor = processors.ByteLevel(trim_offsets=False)
    engine.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    eos = known.eos_token if known is not None else None
    return Tokenizer(
        engine,
        special_tokens={"eos_token": eos if eos in special_tokens else None},
        split_special_tokens=True,
        source_format="tiktoken",
    )
