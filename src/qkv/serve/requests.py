"""What a client of the engine holds: a `Request`, the `Handle` it gets back, and the events it
reads from it (`TokenEvent`s, then one `FinishEvent`); `QueueFull` and `EngineStats` too.

A handle's events are pushed by the scheduler thread and read from any thread (`events`) or from
an asyncio event loop (`aevents`, woken through `call_soon_threadsafe`, never blocking the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from qkv.generation.options import GenerationConfig
from qkv.generation.processors import LogitsProcessor


@dataclass
class Request:
    """One completion: prompt ids and its own decoding options (greedy when temperature == 0)."""

    prompt_ids: list[int]
    config: GenerationConfig
    skip_special_tokens: bool = True
    # Extra logits processors run after the config's (the same signature as generate()'s).
    processors: Sequence[LogitsProcessor] = ()


@dataclass
class TokenEvent:
    """One generated token and the text that became safe to show with it (may be "")."""

    token_id: int
    text: str
    logprob: float | None = None  # when the config asks for logprobs (raw distribution, as decode.py)
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    """The last event of a request."""

    reason: str  # "stop" (EOS or stop string), "length", "abort", or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    error: str | None = None  # message when reason == "error"
    # Text held back until the end (TextStream holds the last grapheme until the next token shows
    # it complete; after an EOS it is complete): append it to the streamed text.
    text: str = ""


class QueueFull(Exception):
    """The engine's queue is full; retry after `retry_after` seconds (an estimate)."""

    def __init__(self, retry_after: float, depth: int) -> None:
        super().__init__(f"the queue is full ({depth} requests waiting); retry in {retry_after:.1f} s")
        self.retry_after = retry_after


@dataclass
class EngineStats:
    """A snapshot of the engine's load and counters."""

    queue_depth: int
    active_slots: int
    max_batch: int
    tokens_generated: int
    prompt_tokens: int
    cached_tokens: int
    requests_finished: int
    requests_aborted: int
    ttft_seconds: list[float] = field(default_factory=list)  # recent samples
    step_seconds: list[float] = field(default_factory=list)  # recent decode-step samples


Event = TokenEvent | FinishEvent


class Handle:
    """A submitted request: its events (blocking or async) and `abort`."""

    _ids = itertools.count(1)

    def __init__(self, request: Request, wake: Callable[[], None]) -> None:
        self.id = f"req-{next(self._ids)}"
        self.request = request
        self._wake = wake  # tells the scheduler to look (an abort)
        self._events: deque[Event] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.aborted = False
        self.finished = False
        self.submitted = time.perf_counter()

    def _put(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self.finished = self.finished or isinstance(event, FinishEvent)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            with contextlib.suppress(RuntimeError):  # that event loop has closed
                loop.call_soon_threadsafe(flag.set)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """TokenEvents, then one FinishEvent; TimeoutError when none arrives within `timeout` s."""
        while True:
            with self._cond:
                if not self._events and not self._cond.wait_for(lambda: self._events, timeout):
                    raise TimeoutError(f"request {self.id}: no event within {timeout} s")
                event = self._events.popleft()
            yield event
            if isinstance(event, FinishEvent):
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """`events` for asyncio servers: waits without blocking the event loop."""
        flag = asyncio.Event()
        entry = (asyncio.get_running_loop(), flag)
        with self._cond:
            self._waiters.append(entry)
        try:
            while True:
                flag.clear()
                with self._cond:
                    batch = list(self._events)
                    self._events.clear()
                if not batch:
                    await flag.wait()
                    continue
                for event in batch:
                    yield event
                    if isinstance(event, FinishEvent):
                        return
        finally:
            with self._cond:
                self._waiters.remove(entry)

    def abort(self) -> None:
        """Stop this request (idempotent): the scheduler frees its row within one step."""
        if not self.aborted:
            self.aborted = True
            self._wake()
