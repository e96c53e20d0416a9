"""What `qkv serve` serves: a loaded model, its tokenizer, and what runs it.

A decoder runs in its continuous-batching `Engine`; an encoder-decoder (completions, and a
decoder's beam search) and an encoder (embeddings) run through the library's own calls
(`qkv.generation.text.complete`, the `qkv.embedding` pieces) on one worker thread per model, one
request at a time, so the event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from qkv.errors import UsageError

T = TypeVar("T")

# A slot holds a whole sequence; past this the slot cache costs more memory than a server wants by
# default (8 slots x 4096 positions of SmolLM2's KV is ~0.7 GB in float32).
DEFAULT_MAX_CONTEXT = 4096


@dataclass
class ServedModel:
    """One model behind the API. kind: "decoder" (chat + completions through the engine),
    "seq2seq" (completions) or "encoder" (embeddings)."""

    name: str
    model: nn.Module
    tokenizer: Any
    engine: Any = None  # qkv.serve.engine.Engine for a decoder
    context: int | None = None  # the longest prompt + completion (a decoder's slot length)
    created: int = 0
    max_pending: int = 64  # worker calls waiting or running beyond which `busy` is true (429)
    _worker: ThreadPoolExecutor | None = field(default=None, repr=False)
    _pending: int = field(default=0, repr=False)
    _token_bytes: list[bytes] | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        family = getattr(self.model.config, "family", None)
        if family == "seq2seq" or getattr(self.model, "is_encoder_decoder", False):
            return "seq2seq"
        return "encoder" if family == "encoder" else "decoder"

    @property
    def has_chat_template(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None

    def start(self) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"qkv-serve-{self.name}")
        if self.engine is not None:
            self.engine.start()

    def stop(self, abort: bool = True) -> None:
        if self.engine is not None:
            self.engine.stop(abort=abort)
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None

    @property
    def busy(self) -> bool:
        """Whether the worker's queue is full: a new call would wait without bound."""
        return self._pending >= self.max_pending

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on this model's worker thread (one call at a time)."""
        if self._worker is None:
            raise RuntimeError(f"model {self.name!r} is not started")
        loop = asyncio.get_running_loop()
        self._pending += 1  # only the event loop's thread counts, so no lock
        try:
            return await loop.run_in_executor(self._worker, lambda: fn(*args, **kwargs))
        finally:
            self._pending -= 1

    def token_bytes(self, token: int) -> bytes:
        """The bytes token id `token` stands for (what OpenAI's logprobs report as `bytes`): exact
        for byte-level BPE and SentencePiece vocabularies, else the UTF-8 of its decoded text."""
        if self._token_bytes is None:
            from qkv.generation.constrained import SPECIAL_MARKER, token_bytes

            try:
                table = token_bytes(self.tokenizer)
                self._token_bytes = [b.removeprefix(SPECIAL_MARKER) for b in table]
            except Exception:  # a vocabulary kind the table does not know (WordPiece, ...)
                self._token_bytes = []
        if 0 <= token < len(self._token_bytes):
            return self._token_bytes[token]
        return self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")


def served_model(
    name: str, model: nn.Module, tokenizer: Any = None, engine_options: Any = None, max_context: int | None = None
) -> ServedModel:
    """A `ServedModel` for an already loaded `model` (tokenizer default: ``model.tokenizer``); a
    decoder gets its `Engine` (options: `engine_options`, with the slot length set to the context)."""
    import time

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UsageError(f"model {name!r} carries no tokenizer; the server needs one to read prompts")
    served = ServedModel(name=name, model=model, tokenizer=tokenizer, created=int(time.time()))
    if served.kind == "decoder":
        from qkv.serve.engine import Engine, EngineOptions

        options = engine_options if engine_options is not None else EngineOptions()
        limit = model.config.context_limit
        context = max_context or options.max_context or min(limit or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
        if limit is not None and context > limit:
            raise UsageError(f"max_context={context} exceeds model {name!r}'s context of {limit} tokens")
        served.context = context
        served.engine = Engine(model, tokenizer, replace(options, max_context=context))
    else:
        served.context = model.config.context_limit
    return served


def parse_model_spec(spec: str) -> tuple[str, str]:
    """`name=path` or `path` -> (served name, source); the name defaults to the path's stem."""
    name, sep, source = spec.partition("=")
    if sep and name and source and "/" not in name and os.sep not in name:
        return name, source
    source = spec
    stem = Path(source.rstrip("/\\")).name
    return (Path(stem).stem if stem.endswith(".gguf") else stem), source


def load_served(spec: str, engine_options: Any = None, dtype: str | None = None) -> ServedModel:
    """Load a model for serving from a `qkv serve` argument (`name=path` or anything `qkv.load` takes)."""
    from qkv import hub
    from qkv.embedding.encode import load_sentence_model
    from qkv.loading import load

    name, source = parse_model_spec(spec)
    model = load(source, dtype=dtype)
    if getattr(model.config, "family", None) == "encoder":  # its sentence-transformers settings too
        model = load_sentence_model(hub.resolve(source), dtype=dtype)
    return served_model(name, model, engine_options=engine_options)


# -- embeddings ----------------------------------------------------------------------------------
def embed_ids(model: nn.Module, tokenizer: Any, rows: Sequence[Sequence[int]], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings [N, D] (float32, CPU) of token-id rows taken as the whole model input,
    pooled and normalised as `qkv.embedding.embed` does for text."""
    from qkv.embedding.encode import _pad_id, resolve_settings
    from qkv.models.heads import pool
    from qkv.tokenizer.batch import pad_batch

    settings = resolve_settings(model)
    vocab = model.config.vocab_size
    for i, row in enumerate(rows):
        if settings.max_seq_length is not None and len(row) > settings.max_seq_length:
            raise UsageError(
                f"input[{i}] has {len(row)} tokens, more than the model's {settings.max_seq_length}; shorten it"
            )
        bad = [t for t in row if t >= vocab]
        if bad:
            raise UsageError(f"input[{i}] holds token id {bad[0]}, outside the vocabulary of {vocab}")
    pad_id = _pad_id(model, tokenizer)
    out = torch.empty(0)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, mask = pad_batch([rows[i] for i in batch], pad_id, model.device)
            hidden = model(input_ids, attention_mask=mask).last_hidden_state  # [B, T, D]
            vectors = pool(hidden.float(), mask, settings.pooling, settings.normalize).cpu()  # [B, D]
            if out.numel() == 0:
                out = vectors.new_empty(len(rows), vectors.shape[-1])
            out[batch] = vectors
    return out


def embed_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
    """(embeddings [N, D], tokens read) of texts, tokenized and truncated as `qkv.embedding.embed` does."""
    from qkv.embedding.encode import resolve_settings, tokenize

    settings = resolve_settings(model)
    rows = tokenize(tokenizer, list(texts), settings.max_seq_length, lowercase=settings.lowercase)
    return embed_ids(model, tokenizer, rows), sum(len(r) for r in rows)
