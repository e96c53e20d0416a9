"""Running one API request's choices: n engine requests, or one library call on a worker thread.

Both paths end in the same `Choice` record, which the endpoints shape as OpenAI's answers; both
can stream (`stream_engine`, `stream_worker`) as ``(choice index, event)`` pairs, and both stop
their work when the consumer goes away (a disconnected client): engine handles are aborted, a
worker's generation loop is left at its next token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qkv.errors import UsageError
from qkv.generation.options import GenerationConfig
from qkv.serve.errors import APIError, bad_request, queue_full
from qkv.serve.metrics import Metrics
from qkv.serve.models import ServedModel


@dataclass
class Piece:
    """Some generated tokens and the text they made safe to show (the worker and engine paths alike)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]] | None]] = field(default_factory=list)


@dataclass
class Done:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    text: str = ""  # text held back until the end


@dataclass
class Choice:
    """One finished choice: its text, tokens, log-probs and counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]] | None]] = field(default_factory=list)
    done: Done | None = None

    def add(self, event: Piece | Done) -> None:
        if isinstance(event, Piece):
            self.text += event.text
            self.token_ids += event.token_ids
            self.logprobs += event.logprobs
        else:
            self.text += event.text
            self.done = event


def finish_reason(reason: str) -> str:
    """OpenAI's finish_reason: the context filling up is "length" too."""
    return "stop" if reason == "stop" else "length"


# -- the engine path ----------------------------------------------------------------------------
def submit_all(served: ServedModel, prompt_ids: list[int], configs: list[GenerationConfig]) -> list[Any]:
    """Queue one engine request per config; all or none (429 when the queue is full)."""
    from qkv.serve.engine import QueueFull, Request

    handles: list[Any] = []
    try:
        for config in configs:
            handles.append(served.engine.submit(Request(prompt_ids, config)))
    except QueueFull as exc:
        for handle in handles:
            handle.abort()
        raise queue_full(exc.retry_after) from None
    except UsageError as exc:
        for handle in handles:
            handle.abort()
        raise _usage_error(exc) from None
    return handles


def _usage_error(exc: UsageError) -> APIError:
    message = str(exc)
    if "context" in message:
        return bad_request(message, "max_tokens", "context_length_exceeded")
    return bad_request(message)


async def stream_engine(
    served: ServedModel, handles: list[Any], metrics: Metrics, started: float
) -> AsyncIterator[tuple[int, Piece | Done]]:
    """Events of all handles as they come, as (choice index, Piece or Done). An engine error is a
    500 APIError; leaving early aborts every handle."""
    from qkv.serve.engine import FinishEvent

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: Any) -> None:
        try:
            async for event in handle.aevents():
                queue.put_nowait((i, event))
        except Exception as exc:  # never lose a choice silently
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    last: dict[int, float] = {}
    open_ = len(tasks)
    try:
        while open_:
            i, event = await queue.get()
            if event is None:
                open_ -= 1
            elif isinstance(event, Exception):
                raise APIError(500, f"generation failed: {type(event).__name__}: {event}")
            elif isinstance(event, FinishEvent):
                if event.reason in ("error", "abort"):
                    why = event.error or "the server is shutting down"
                    raise APIError(500 if event.reason == "error" else 503, f"generation {event.reason}: {why}")
                done = Done(event.reason, event.prompt_tokens, event.completion_tokens, event.cached_tokens, event.text)
                yield i, done
            else:
                now = time.perf_counter()
                if not last:
                    metrics.first_token(served.name, now - started)
                metrics.tokens(served.name, 1, now - last[i] if i in last else None)
                last[i] = now
                top = list(event.top_logprobs) if event.top_logprobs is not None else None
                lp = [(event.token_id, event.logprob, top)] if event.logprob is not None else []
                yield i, Piece(event.text, [event.token_id], lp)
    finally:
        for task in tasks:
            task.cancel()
        for handle in handles:
            handle.abort()


# -- the worker path ----------------------------------------------------------------------------
async def stream_worker(
    served: ServedModel, jobs: list[Callable[[], Iterator[Any]]], metrics: Metrics, started: float
) -> AsyncIterator[tuple[int, Piece | Done]]:
    """Run each job (an iterator of text pieces ending in a `qkv.generation.text.Completion`, as
    `stream_completion` yields, or of the Completion alone) in turn on the model's worker thread,
    as (job index, Piece | Done); leaving early stops the loop at its next item."""
    from qkv.generation.text import Completion

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def work() -> None:
        try:
            for k, make in enumerate(jobs):
                for item in make():
                    loop.call_soon_threadsafe(queue.put_nowait, (k, item))
                    if cancelled.is_set():
                        return
        except BaseException as exc:  # handed to the event loop, raised there
            loop.call_soon_threadsafe(queue.put_nowait, (-1, exc))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, (-1, None))

    future = asyncio.ensure_future(served.run(work))
    shown = [""] * len(jobs)
    first = True
    try:
        while True:
            k, item = await queue.get()
            if item is None:
                break
            if isinstance(item, UsageError):
                raise _usage_error(item)
            if isinstance(item, BaseException):
                raise item
            if first:
                metrics.first_token(served.name, time.perf_counter() - started)
                first = False
            if isinstance(item, str):
                shown[k] += item
                yield k, Piece(item)
            elif isinstance(item, Completion):
                metrics.tokens(served.name, item.completion_tokens)
                lps = [
                    (r["id"], r["logprob"], [(t["id"], t["logprob"]) for t in r.get("top", [])] or None)
                    for r in item.logprobs or []
                ]
                rest = item.text[len(shown[k]) :] if item.text.startswith(shown[k]) else ""
                yield k, Piece(rest, list(item.token_ids), lps)
                yield k, Done(finish_reason(item.finish_reason), item.prompt_tokens, item.completion_tokens)
        await future
    finally:
        cancelled.set()


async def collect(events: AsyncIterator[tuple[int, Piece | Done]], n: int) -> list[Choice]:
    """Every choice, complete."""
    choices = [Choice() for _ in range(n)]
    async for i, event in events:
        choices[i].add(event)
    return choices
