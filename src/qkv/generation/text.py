"""Text in, text out: prompts, stop strings, streaming and timings on top of the token loop.

Streaming yields text increments that are safe to show: never half a UTF-8 character (a trailing
U+FFFD from incomplete bytes is held back), never half a grapheme cluster (the last cluster is
held until the next token shows it is complete: ZWJ emoji, combining marks), and never the start
of a stop string (held until it either completes, and is dropped, or diverges).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import regex
import torch

from qkv.errors import GenerationOptionError, UsageError
from qkv.generation.beam import beam_search
from qkv.generation.decode import decode_steps, generation_budget, is_encoder_decoder, resolve_eos
from qkv.generation.options import GenerationConfig
from qkv.generation.stopping import StopStrings, find_stop

_GRAPHEME = regex.compile(r"\X")


def _last_grapheme_start(text: str) -> int:
    if not text:
        return 0
    # Search a short tail only: grapheme clusters are short, the text may be long.
    tail_start = max(0, len(text) - 64)
    last = tail_start
    for m in _GRAPHEME.finditer(text, tail_start):
        last = m.start()
    return last


class TextStream:
    """Turns a growing list of token ids into safe text increments and detects stop strings."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.stop_hit: str | None = None

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became safe to show (may be empty)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            hit = find_stop(text, self.stop, max(0, self.emitted - longest + 1))
            if hit is not None:
                self.stopped = True
                self.stop_hit = hit[1]
                self.text = text[: max(hit[0], self.emitted)]
                piece, self.emitted = self.text[self.emitted :], len(self.text)
                return piece
        self.text = text
        # Trailing U+FFFD is a character whose bytes are still arriving: the holds below apply to the
        # text before it, whose last grapheme (or stop-string prefix) that character may extend.
        whole = text.rstrip("\ufffd")
        safe = _last_grapheme_start(whole)
        for s in self.stop:
            for k in range(min(len(s) - 1, len(whole)), 0, -1):
                if whole.endswith(s[:k]):
                    safe = min(safe, len(whole) - k)
                    break
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted : safe], safe
        return piece

    def flush(self) -> str:
        """Everything not yet shown (call once generation has ended)."""
        piece, self.emitted = self.text[self.emitted :], len(self.text)
        return piece


@dataclass
class Completion:
    """The result of `complete`: text, ids, why it stopped, timings and (optionally) log-probs."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_new_tokens), "context" (context full)
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    logprobs: list[dict[str, Any]] | None = None
    stopped_by: str | None = None  # the EOS token or stop string that ended it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        n = max(self.completion_tokens - 1, 0)  # the first token comes from the prefill
        if n == 0:  # nothing decoded after the prefill (0/0): report 0, never inf (invalid in JSON)
            return 0.0
        return n / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stopped_by": self.stopped_by,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
            "timings": {
                "prefill_seconds": round(self.prefill_seconds, 6),
                "decode_seconds": round(self.decode_seconds, 6),
                "prompt_tokens_per_second": round(self.prompt_tokens_per_second, 2),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
            },
            **({"logprobs": self.logprobs} if self.logprobs is not None else {}),
        }


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int], add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt (text or ids), with a clear error when it is empty."""
    ids = (
        list(prompt) if not isinstance(prompt, str) else tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    )
    if not ids:
        raise UsageError("the prompt is empty and the tokenizer adds no BOS token; give a non-empty prompt")
    return ids


def _prepare(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    config: GenerationConfig | None,
    add_special_tokens: bool,
    options: dict[str, Any],
) -> tuple[GenerationConfig, list[int], int, tuple[int, ...]]:
    """(config, prompt ids, tokens to generate, EOS ids) for one text completion."""
    config = GenerationConfig.build(config, **options)
    if config.num_return_sequences > 1:
        raise GenerationOptionError(
            f"num_return_sequences={config.num_return_sequences}: a completion is one text; "
            "call generate() for several sequences"
        )
    ids = encode_prompt(tokenizer, prompt, add_special_tokens)
    n_new = generation_budget(model, len(ids), config.max_new_tokens)
    return config, ids, n_new, resolve_eos(config, model, tokenizer)


def stream_completion(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    *,
    add_special_tokens: bool = True,
    compile: bool | None = None,
    **options: Any,
) -> Iterator[str | Completion]:
    """Yield text pieces as they become safe to show, then, last, the `Completion`.

    Options as `qkv.generation.generate` (a `GenerationConfig` and/or keywords). Beam search
    knows its text only at the end, so it cannot stream: use `complete`. Stopping the iteration
    early is allowed and frees everything (the cache lives in the loop).
    """
    config, ids, n_new, eos = _prepare(model, tokenizer, prompt, config, add_special_tokens, options)
    if config.num_beams > 1:
        raise GenerationOptionError(
            "beam search (num_beams > 1) finds its text only at the end and cannot stream; call complete()"
        )
    input_ids = torch.tensor([ids], device=model.device)
    text = TextStream(tokenizer, config.stop)
    out_ids: list[int] = []
    records: list[dict[str, Any]] | None = [] if config.wants_logprobs else None
    finish, stopped_by = "length" if n_new == config.max_new_tokens else "context", None
    start = time.perf_counter()
    first = None
    for step in decode_steps(model, input_ids, config, n_new, eos, compile=compile, tokenizer=tokenizer):
        if first is None:
            first = time.perf_counter()
        token = int(step.tokens[0])
        if bool(step.eos[0]):
            finish, stopped_by = "stop", tokenizer.decode([token]) if hasattr(tokenizer, "decode") else str(token)
            break
        out_ids.append(token)
        if records is not None:
            record = {"id": token, "token": tokenizer.decode([token]), "logprob": float(step.logprobs[0])}
            if config.top_logprobs:
                record["top"] = [
                    {"id": int(i), "token": tokenizer.decode([int(i)]), "logprob": float(lp)}
                    for i, lp in zip(step.top_ids[0], step.top_logprobs[0])
                ]
            records.append(record)
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            finish, stopped_by = "stop", text.stop_hit
            break
    end = time.perf_counter()
    rest = text.flush()
    if rest:
        yield rest
    yield Completion(
        text=text.text,
        token_ids=out_ids,
        finish_reason=finish,
        prompt_tokens=len(ids),
        prefill_seconds=(first or end) - start,
        decode_seconds=end - (first or end),
        logprobs=records,
        stopped_by=stopped_by,
    )


def trim_at_eos(tokens: Sequence[int], eos: Sequence[int]) -> tuple[list[int], int | None]:
    """(tokens before the first EOS id, that EOS id or None): a finished row's text ends there."""
    for i, token in enumerate(tokens):
        if token in eos:
            return list(tokens[:i]), token
    return list(tokens), None


def _beam_completion(
    model: torch.nn.Module, tokenizer: Any, config: GenerationConfig, ids: list[int], n_new: int, eos: tuple[int, ...]
) -> Completion:
    """The best beam-search hypothesis as a `Completion` (cut at its EOS or stop string)."""
    start = time.perf_counter()
    stop = StopStrings(tokenizer, config.stop) if config.stop else None
    out = beam_search(model, torch.tensor([ids], device=model.device), config, n_new, eos, stop=stop)
    end = time.perf_counter()
    start = 1 if is_encoder_decoder(model) else len(ids)  # a seq2seq output continues the start token
    tokens, eos_hit = trim_at_eos(out[0, start:].tolist(), eos)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    hit = find_stop(text, config.stop) if config.stop else None
    if eos_hit is not None:
        finish, stopped_by = "stop", tokenizer.decode([eos_hit])
    elif hit is not None:
        finish, stopped_by, text = "stop", hit[1], text[: hit[0]]
    else:
        finish, stopped_by = ("length" if n_new == config.max_new_tokens else "context"), None
    return Completion(
        text=text, token_ids=tokens, finish_reason=finish, prompt_tokens=len(ids), prefill_seconds=0.0,
        decode_seconds=end - start, stopped_by=stopped_by, extra={"num_beams": config.num_beams},
    )  # fmt: skip


def complete(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    *,
    add_special_tokens: bool = True,
    compile: bool | None = None,
    **options: Any,
) -> Completion:
    """Generate a completion for one prompt (options as `stream_completion`; beam search too)."""
    resolved = GenerationConfig.build(config, **options)
    if resolved.num_beams > 1:
        if compile:
            raise GenerationOptionError("compile=True applies to greedy and sampled decoding, not to beam search")
        resolved, ids, n_new, eos = _prepare(model, tokenizer, prompt, resolved, add_special_tokens, {})
        return _beam_completion(model, tokenizer, resolved, ids, n_new, eos)
    result = None
    for item in stream_completion(
        model, tokenizer, prompt, resolved, add_special_tokens=add_special_tokens, compile=compile
    ):  # fmt: skip
        result = item
    return result


def stream(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    **options: Any,
) -> Iterator[str]:
    """Yield the completion's text pieces as they are decoded (options as `stream_completion`)."""
    for item in stream_completion(model, tokenizer, prompt, config, **options):
        if isinstance(item, str):
            yield item
