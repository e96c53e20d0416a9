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

from qkv.generation.decode import (
    check_options,
    context_budget,
    decode_steps,
    eos_tensor,
    sampling_setup,
)

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
            start = max(0, self.emitted - longest + 1)
            hits = sorted((i, s) for s in self.stop if (i := text.find(s, start)) >= 0)
            if hits:
                self.stopped = True
                self.stop_hit = hits[0][1]
                self.text = text[: max(hits[0][0], self.emitted)]
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
        raise ValueError("the prompt is empty and the tokenizer adds no BOS token; give a non-empty prompt")
    return ids


def stream_completion(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    eos_token_id: int | list[int] | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    add_special_tokens: bool = True,
    compile: bool = False,
) -> Iterator[str | Completion]:
    """Yield text pieces as they become safe to show, then, last, the `Completion`.

    Stopping the iteration early is allowed and frees everything (the cache lives in the loop).
    """
    check_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, typical_p=typical_p)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    ids = encode_prompt(tokenizer, prompt, add_special_tokens)
    n_new = context_budget(model, len(ids), max_new_tokens)
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = model.config.eos_token_id
    eos = eos_tensor(eos_token_id, model.device)
    processors, generator, greedy = sampling_setup(
        temperature, top_k, top_p, min_p, typical_p, repetition_penalty, frequency_penalty, presence_penalty, seed,
        len(ids), model.device,
    )  # fmt: skip
    input_ids = torch.tensor([ids], device=model.device)
    text = TextStream(tokenizer, stop)
    out_ids: list[int] = []
    records: list[dict[str, Any]] | None = [] if (logprobs or top_logprobs) else None
    finish, stopped_by = "length" if n_new == max_new_tokens else "context", None
    start = time.perf_counter()
    first = None
    steps = decode_steps(
        model, input_ids, n_new, processors, greedy, generator, eos, 0, None, top_logprobs, bool(logprobs), compile
    )
    for step in steps:
        if first is None:
            first = time.perf_counter()
        token = int(step.tokens[0])
        if bool(step.finished[0]):
            finish, stopped_by = "stop", tokenizer.decode([token]) if hasattr(tokenizer, "decode") else str(token)
            break
        out_ids.append(token)
        if records is not None:
            record = {"id": token, "token": tokenizer.decode([token]), "logprob": float(step.logprobs[0])}
            if top_logprobs:
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


def complete(model: torch.nn.Module, tokenizer: Any, prompt: str | Sequence[int], **options: Any) -> Completion:
    """Generate a completion for one prompt (options as `stream_completion`)."""
    result = None
    for item in stream_completion(model, tokenizer, prompt, **options):
        result = item
    return result


def stream(model: torch.nn.Module, tokenizer: Any, prompt: str | Sequence[int], **options: Any) -> Iterator[str]:
    """Yield the completion's text pieces as they are decoded (options as `stream_completion`)."""
    for item in stream_completion(model, tokenizer, prompt, **options):
        if isinstance(item, str):
            yield item
