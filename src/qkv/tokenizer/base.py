"""The `Tokenizer`: one interface over a Hugging Face `tokenizers` engine, whatever file it came from.

The engine does the work (normalise, pre-tokenise, BPE/WordPiece/Unigram, post-process, decode);
this class adds what the file formats need on top: special-token roles (bos/eos/pad/unk, ...),
control over which special tokens are recognised in text (``allowed_special``, as tiktoken does),
id checks on decode, the model's chat template, and atomic saving.

    >>> tok = Tokenizer.train(texts=["low lower lowest"] * 50, vocab_size=300, show_progress=False)
    >>> tok.decode(tok.encode("lower")) == "lower"
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tokenizers

from qkv.atomic import atomic_write_text
from qkv.errors import TokenizerError, UsageError

# The keys of tokenizer_config.json that name a special token's role.
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")

AllowedSpecial = Literal["all"] | Iterable[str]

# One engine copy is built per distinct `allowed_special` subset; keep only a few.
_MAX_SUBSET_ENGINES = 8


@dataclass(frozen=True)
class Encoding:
    """One encoded text: ``ids[i]`` is spelled ``tokens[i]`` in the vocabulary and covers
    ``text[offsets[i][0]:offsets[i][1]]`` (character offsets; ``(0, 0)`` for added special tokens)."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]


class Tokenizer:
    """Text ↔ token ids, over a `tokenizers.Tokenizer` engine.

    Build one with :func:`qkv.tokenizer.load_tokenizer` (tokenizer.json, vocab.json + merges.txt,
    vocab.txt, ``*.tiktoken``, GGUF) or :meth:`Tokenizer.train`.

    Special tokens written in the text (``"<|endoftext|>"``) become their special id only when
    allowed: ``allowed_special="all"``, a set of token strings, or ``()`` for none, in which case
    they are tokenised as the plain text they are. The default (``allowed_special=None``) is
    ``"all"`` -- what Hugging Face tokenizers do -- except for tokenizers that came from a tiktoken
    rank file (or whose tokenizer_config.json sets ``split_special_tokens``), where it is none, as
    in tiktoken's ``encode_ordinary``.
    """

    def __init__(
        self,
        engine: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | None = None,
        split_special_tokens: bool = False,
        source_format: str = "tokenizer.json",
        gapless_size: int | None = None,
    ) -> None:
        # tokenizer.json files may carry a padding/truncation setting (all-MiniLM-L6-v2 pads every
        # text to 128); transformers ignores it unless asked, and so do we.
        engine.no_truncation()
        engine.no_padding()
        self.engine = engine
        self.chat_template = chat_template
        self.split_special_tokens = split_special_tokens
        self.source_format = source_format
        # Ids can have gaps (cl100k_base has no 100261..100275), so the size is the largest id + 1,
        # which is also the number of rows a model's embedding needs. A caller that built the
        # engine with the ids 0 .. n - 1 and no others passes gapless_size=n: reading a vocabulary
        # of 10^5 tokens back from the engine costs ~15 ms.
        if gapless_size is None:
            vocab = engine.get_vocab(with_added_tokens=True)
            self.vocab_size = max(vocab.values(), default=-1) + 1
            present = set(vocab.values())
            self._missing_ids = frozenset(i for i in range(self.vocab_size) if i not in present)
        else:
            self.vocab_size, self._missing_ids = gapless_size, frozenset()
        self.special_tokens: dict[str, str] = {}
        for role, token in (special_tokens or {}).items():
            if token is None:
                continue
            if role not in SPECIAL_ROLES:
                raise UsageError(f"unknown special token role {role!r}; roles are {', '.join(SPECIAL_ROLES)}")
            if engine.token_to_id(token) is None:
                raise TokenizerError(f"{role} {token!r} is not in the vocabulary ({source_format})")
            self.special_tokens[role] = token
        added = engine.get_added_tokens_decoder().values()
        self.all_special_tokens: frozenset[str] = frozenset(t.content for t in added if t.special)
        self._subset_engines: dict[frozenset[str], tokenizers.Tokenizer] = {}
        self._plain_engine: tokenizers.Tokenizer | None = None

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def load(cls, source: str | os.PathLike) -> Tokenizer:
        """Same as :func:`qkv.tokenizer.load_tokenizer`."""
        from qkv.tokenizer.loaders import load_tokenizer

        return load_tokenizer(source)

    @classmethod
    def train(cls, **kwargs: Any) -> Tokenizer:
        """Same as :func:`qkv.tokenizer.train_tokenizer` (keyword arguments only)."""
        from qkv.tokenizer.train import train_tokenizer

        return train_tokenizer(**kwargs)

    # ----- vocabulary ---------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The engine's model: ``"bpe"``, ``"wordpiece"``, ``"unigram"`` or ``"wordlevel"``."""
        return type(self.engine.model).__name__.lower()

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` as spelled in the vocabulary (``"Ġthe"``, ``"##ing"``), or None."""
        return self.engine.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """How the vocabulary spells ``token_id``; TokenizerError if there is no such id."""
        self._check_ids([token_id])
        return self.engine.id_to_token(token_id)

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.engine.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._role_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._role_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._role_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._role_id("unk_token")

    # ----- encode -------------------------------------------------------------------------------

    def encode(
        self, text: str, add_special_tokens: bool = True, allowed_special: AllowedSpecial | None = None
    ) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens`` adds what the model's post-processor adds
        (BERT's ``[CLS] … [SEP]``, LLaMA's BOS); ``allowed_special`` is described on the class."""
        return self._encode(text, add_special_tokens, allowed_special).ids

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True, allowed_special: AllowedSpecial | None = None
    ) -> Encoding:
        """Ids, vocabulary spellings and character offsets of ``text``."""
        enc = self._encode(text, add_special_tokens, allowed_special)
        return Encoding(ids=enc.ids, tokens=enc.tokens, offsets=enc.offsets)

    def encode_batch(
        self,
        texts: Sequence[str],
        add_special_tokens: bool = True,
        allowed_special: AllowedSpecial | None = None,
    ) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the engine; equal to encoding one by one."""
        engine = self._engine_for(allowed_special)
        texts = list(texts)
        try:
            encodings = engine.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        except TypeError:
            encodings = engine.encode_batch_fast(
                [_valid_unicode(t) for t in texts], add_special_tokens=add_special_tokens
            )
        return [e.ids for e in encodings]

    def _encode(
        self, text: str, add_special_tokens: bool, allowed_special: AllowedSpecial | None
    ) -> tokenizers.Encoding:
        engine = self._engine_for(allowed_special)
        try:
            return engine.encode(text, add_special_tokens=add_special_tokens)
        except TypeError:
            return engine.encode(_valid_unicode(text), add_special_tokens=add_special_tokens)

    def _engine_for(self, allowed_special: AllowedSpecial | None) -> tokenizers.Tokenizer:
        """The engine that recognises exactly the allowed special tokens in text."""
        if allowed_special is None:
            if not self.split_special_tokens:
                return self.engine
            allowed_special = ()
        if allowed_special == "all":
            return self.engine
        if isinstance(allowed_special, str):
            raise UsageError(f'allowed_special must be "all" or a set of tokens, got the string {allowed_special!r}')
        allowed = frozenset(allowed_special)
        if allowed == self.all_special_tokens:
            return self.engine
        unknown = allowed - self.all_special_tokens
        if unknown:
            raise TokenizerError(
                f"allowed_special names {sorted(unknown)}, which are not special tokens of this tokenizer "
                f"(its special tokens: {sorted(self.all_special_tokens)})"
            )
        if not allowed:
            if self._plain_engine is None:
                self._plain_engine = self._copy_engine(allowed)
            return self._plain_engine
        engine = self._subset_engines.get(allowed)
        if engine is None:
            if len(self._subset_engines) >= _MAX_SUBSET_ENGINES:
                self._subset_engines.pop(next(iter(self._subset_engines)))
            engine = self._subset_engines[allowed] = self._copy_engine(allowed)
        return engine

    def _copy_engine(self, allowed: frozenset[str]) -> tokenizers.Tokenizer:
        # The engine can only stop recognising special tokens all at once (`encode_special_tokens`).
        # For a subset, a second engine marks the allowed ones non-special: added tokens that are
        # not special are always recognised, so only the others are split as plain text. It shares
        # the model (vocabulary, merges) with the original, so it costs next to nothing, and is used
        # only to encode; decoding (skip_special_tokens) stays with the original.
        engine = tokenizers.Tokenizer(self.engine.model)
        engine.normalizer = self.engine.normalizer
        engine.pre_tokenizer = self.engine.pre_tokenizer
        engine.post_processor = self.engine.post_processor
        engine.decoder = self.engine.decoder
        added = sorted(self.engine.get_added_tokens_decoder().items())
        for _, token in added:  # in id order, so tokens beyond the model's vocabulary get the same ids
            copy = tokenizers.AddedToken(
                token.content,
                single_word=token.single_word,
                lstrip=token.lstrip,
                rstrip=token.rstrip,
                normalized=token.normalized,
                special=token.special and token.content not in allowed,
            )
            (engine.add_special_tokens if copy.special else engine.add_tokens)([copy])
        if sorted(engine.get_added_tokens_decoder()) != [token_id for token_id, _ in added]:
            raise RuntimeError("qkv could not copy the tokenizer's added tokens with their ids")
        engine.encode_special_tokens = True
        return engine

    # ----- decode -------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (a list, or a 1-D tensor/array); bytes that do not form valid
        UTF-8 become U+FFFD, as in tiktoken. TokenizerError for an id that is not in the vocabulary."""
        ids = _as_int_list(ids)
        self._check_ids(ids)
        return self.engine.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` of each sequence."""
        batch = [_as_int_list(ids) for ids in batch]
        for ids in batch:
            self._check_ids(ids)
        return self.engine.decode_batch(batch, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            return
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise TokenizerError(f"token id {bad} is out of range for a vocabulary of size {self.vocab_size}")
        if self._missing_ids and not self._missing_ids.isdisjoint(ids):
            bad = min(self._missing_ids.intersection(ids))
            raise TokenizerError(
                f"token id {bad} is not in the vocabulary (size {self.vocab_size}; that id is an unused gap)"
            )

    # ----- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` (``[{"role": "user", "content": "Hi"}, ...]``) with the model's chat
        template, in a sandbox. ``template`` overrides it: a built-in name (``"chatml"``) or Jinja
        source. Extra keyword arguments (``tools=...``) are passed to the template. With
        ``tokenize=True`` the ids are returned, special tokens in the rendered text recognised."""
        from qkv.tokenizer.chat_template import render_chat_template, resolve_template

        source = resolve_template(template, self.chat_template)
        variables = {**self.special_tokens, **kwargs}
        text = render_chat_template(source, messages, add_generation_prompt=add_generation_prompt, **variables)
        if tokenize:
            return self.encode(text, add_special_tokens=False, allowed_special="all")
        return text

    # ----- save ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Save as Hugging Face files; returns the path of the tokenizer.json written.

        A directory gets ``tokenizer.json`` and ``tokenizer_config.json`` (special-token roles,
        chat template), which ``transformers.AutoTokenizer`` loads; a path ending in ``.json``
        gets that one file (and no roles). Each file is replaced atomically: a failed save leaves
        the previous file intact.
        """
        path = Path(path)
        if path.suffix == ".json":
            json_path, config_path = path, None
        else:
            json_path, config_path = path / "tokenizer.json", path / "tokenizer_config.json"
        # Serialise everything before writing anything, so an error leaves no file half-replaced.
        engine_text = self.engine.to_str(pretty=True)
        config_text = json.dumps(self._config(), indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(json_path, engine_text)
        if config_path is not None:
            atomic_write_text(config_path, config_text)
        return json_path

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self.split_special_tokens:
            config["split_special_tokens"] = True
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, source_format={self.source_format!r})"


def _valid_unicode(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD and surrogate pairs joined, exactly as
    tiktoken does before encoding (tiktoken/core.py, ``Encoding.encode``)."""
    if not isinstance(text, str):
        raise TypeError(f"expected text as str, got {type(text).__name__}")
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _as_int_list(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):  # torch tensors, numpy arrays
        ids = ids.tolist()
    ids = ids if isinstance(ids, list) else list(ids)
    if not all(isinstance(i, int) for i in ids):
        bad = next(i for i in ids if not isinstance(i, int))
        raise TokenizerError(f"token ids must be integers, got {bad!r} ({type(bad).__name__})")
    return ids
