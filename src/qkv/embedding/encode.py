"""`embed`: sentence embeddings from an encoder, as sentence-transformers computes them.

All texts are tokenized up front (in parallel, by the tokenizer engine), ordered by token count
and cut into batches of neighbours, so a batch pads only to its own longest text and little
compute goes to padding; rows come back in input order. Truncation keeps the special tokens, as
Hugging Face tokenizers do: ``[CLS] first tokens ... [SEP]``.

    >>> model = load_sentence_model("all-minilm-l6-v2")          # doctest: +SKIP
    >>> embed(model, model.tokenizer, ["a cat", "a dog"]).shape  # doctest: +SKIP
    torch.Size([2, 384])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from qkv.embedding.config import SentenceEmbeddingConfig, read_sentence_config
from qkv.errors import TokenizerError, UsageError
from qkv.models.heads import pool
from qkv.tokenizer.batch import pad_batch

if TYPE_CHECKING:
    from qkv.tokenizer import Tokenizer

# Below this many texts a progress bar is more noise than help.
PROGRESS_MIN_TEXTS = 1000


def load_sentence_model(source: str | os.PathLike, dtype: torch.dtype | str | None = None) -> nn.Module:
    """`qkv.load(source, dtype)` with its directory's sentence-transformers settings attached as
    ``model.sentence_config`` (None for a plain encoder directory), which `embed` reads.
    UsageError when the model is not an encoder."""
    from qkv import hub
    from qkv.loading import load

    path = hub.resolve(source)
    model = load(path, dtype=dtype)
    _check_encoder(model)
    if getattr(model, "sentence_config", None) is None:
        model.sentence_config = read_sentence_config(path if path.is_dir() else path.parent)
    return model


def embed(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    texts: Sequence[str],
    batch_size: int = 32,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    config: SentenceEmbeddingConfig | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Sentence embeddings of `texts` -> float32 CPU tensor [N, D], row i for texts[i].

    model: an encoder (`qkv.models.Encoder`), run in its own dtype and on its own device (load it
    with ``dtype="bfloat16"`` for speed); tokenizer: a qkv `Tokenizer` (None: ``model.tokenizer``).
    Settings come from `config`, else ``model.sentence_config`` (see `load_sentence_model`), else
    sentence-transformers' defaults for a plain encoder (mean pooling, no normalisation, the
    model's context); `pooling` ("mean" | "cls" | "max"), `normalize` and `max_length` (tokens,
    special tokens included) override them. progress: a tqdm bar over batches (None: only for
    ``PROGRESS_MIN_TEXTS`` texts or more).
    """
    _check_encoder(model)
    texts = _check_texts(texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size={batch_size!r} must be a positive integer")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UsageError("no tokenizer: pass one (qkv.load_tokenizer(...)) or load a model directory that has one")
    settings = resolve_settings(model, config, pooling=pooling, normalize=normalize, max_length=max_length)
    ids = tokenize(tokenizer, texts, settings.max_seq_length, lowercase=settings.lowercase)
    pad_id = _pad_id(model, tokenizer)

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)  # longest first, as s-t
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    show = progress if progress is not None else len(texts) >= PROGRESS_MIN_TEXTS
    out: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for rows in tqdm(batches, desc="embedding", unit="batch", disable=not show, dynamic_ncols=True):
                input_ids, mask = pad_batch([ids[i] for i in rows], pad_id, model.device)
                hidden = model(input_ids, attention_mask=mask).last_hidden_state  # [B, T, D]
                vectors = pool(hidden.float(), mask, settings.pooling, settings.normalize).cpu()  # [B, D]
                if out is None:
                    out = vectors.new_empty(len(texts), vectors.shape[-1])
                out[rows] = vectors
    finally:
        model.train(was_training)
    return out


def resolve_settings(
    model: nn.Module,
    config: SentenceEmbeddingConfig | None = None,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
) -> SentenceEmbeddingConfig:
    """The settings `embed` uses: `config` (else ``model.sentence_config``, else the defaults) with
    the explicit overrides applied and ``max_seq_length`` filled in from the model's context.
    UsageError when the length does not fit the model."""
    config = config if config is not None else getattr(model, "sentence_config", None)
    config = config if config is not None else SentenceEmbeddingConfig()
    overrides = {"pooling": pooling, "normalize": normalize, "max_seq_length": max_length}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    context = model.config.context_limit
    if config.max_seq_length is None:
        return replace(config, max_seq_length=context)
    if context is not None and config.max_seq_length > context:
        raise UsageError(
            f"max_length={config.max_seq_length} exceeds the model's context of {context} tokens; use {context} or less"
        )
    return config


def tokenize(
    tokenizer: Tokenizer, texts: Sequence[str], max_length: int | None, lowercase: bool = False
) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, cut to `max_length` the way
    Hugging Face's ``truncation=True`` does: text tokens are dropped from the end, the special
    tokens around them are kept."""
    if lowercase:
        texts = [t.lower() for t in texts]
    ids = tokenizer.encode_batch(texts)
    if max_length is None or all(len(row) <= max_length for row in ids):
        return ids
    prefix, suffix = special_affixes(tokenizer)
    if max_length <= prefix + suffix:
        raise UsageError(
            f"max_length={max_length} leaves no room for text next to the {prefix + suffix} special tokens; "
            f"use at least {prefix + suffix + 1}"
        )
    keep = max_length - suffix
    return [row if len(row) <= max_length else row[:keep] + row[len(row) - suffix :] for row in ids]


def special_affixes(tokenizer: Tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text (BERT: 1 and 1)."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return start, len(full) - start - len(bare)
    raise TokenizerError("the tokenizer's special tokens do not surround the text; cannot truncate it safely")


def _pad_id(model: nn.Module, tokenizer: Tokenizer) -> int:
    """The model's padding id (RoBERTa-style positions count on it), else the tokenizer's, else 0;
    padded positions are masked out, so any id in the vocabulary serves otherwise."""
    for candidate in (model.config.pad_token_id, getattr(tokenizer, "pad_token_id", None)):
        if candidate is not None:
            return candidate
    return 0


def _check_encoder(model: nn.Module) -> None:
    family = getattr(getattr(model, "config", None), "family", None)
    if not isinstance(model, nn.Module) or family != "encoder":
        what = f"a {family} model" if family else f"a {type(model).__name__}"
        raise UsageError(
            f"embed needs an encoder model (BERT-style, e.g. 'all-minilm-l6-v2'), got {what}; "
            "sentence embeddings come from an encoder's hidden states"
        )


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise UsageError(f"texts must be a list of strings, got a single {type(texts).__name__}; wrap it: [text]")
    if isinstance(texts, Path):
        raise UsageError("texts must be a list of strings, got a path; read the file first (one text per line)")
    try:
        texts = list(texts)
    except TypeError:
        raise UsageError(f"texts must be a list of strings, got a {type(texts).__name__}") from None
    if not texts:
        raise UsageError("no texts to embed: pass a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UsageError(f"texts[{i}] is a {type(text).__name__}, not a str; every item must be text")
    return texts
