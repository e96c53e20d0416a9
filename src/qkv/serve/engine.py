"""The continuous-batching engine: one scheduler thread decodes every request's tokens together.

A slot cache (a static `KVCache` of `max_batch` rows) gives each request a row of its own, at its
own position. Each scheduler iteration

1. drops aborted requests and admits waiting ones into free rows (copying their prompt's cached
   prefix KV, `qkv.serve.prefix`);
2. prefills prompts, one chunk of at most `prefill_chunk` tokens per row, up to `prefill_chunk`
   tokens in all, so a long prompt is spread over iterations instead of stalling the others;
3. runs one decode step [max_batch, 1] for every decoding row at once: always the same shapes,
   so `torch.compile` captures the step once. The other rows compute garbage and write it where
   nothing reads it before it is overwritten (a free row at slot 0, a row being prefilled at its
   next prompt slot, which its next chunk writes before attending);
4. samples each row's next token with that request's own `GenerationConfig`, processors and
   seeded generator (`qkv.generation.processors` and `sampling`, as `decode_steps` uses them), and
   streams it as a `TokenEvent` (text through `qkv.generation.text.TextStream`).

A row's tokens do not depend on the other rows: the step's shapes never change and no computation
mixes rows, and a prompt's chunks depend only on its own length, so a greedy request gives the
tokens `qkv.generation.generate` gives alone, and a seeded sampled one the same tokens alone or in
a crowd.

    >>> engine = Engine(model, tokenizer, EngineOptions(max_batch=8)); engine.start()
    >>> handle = engine.submit(Request(ids, GenerationConfig(max_new_tokens=64)))
    >>> for event in handle.events(): ...   # TokenEvent..., then one FinishEvent
    >>> engine.stop()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from qkv.errors import UsageError
from qkv.generation.constrained import JsonSchemaProcessor
from qkv.generation.decode import resolve_eos
from qkv.generation.options import GenerationConfig
from qkv.generation.processors import LogitsProcessor, build_processors
from qkv.generation.sampling import sample_next_token
from qkv.generation.static_step import StaticStep, auto_compile
from qkv.generation.text import TextStream
from qkv.serve.prefix import PrefixCache
from qkv.serve.requests import EngineStats, FinishEvent, Handle, QueueFull, Request, TokenEvent

__all__ = ["Engine", "EngineOptions", "EngineStats", "FinishEvent", "Handle", "QueueFull", "Request", "TokenEvent"]

DEFAULT_CONTEXT_CAP = 4096  # slot length when the model's context is longer (or unbounded)
PREFIX_BLOCK = 16  # tokens per prefix-cache block
PREFILL_ROUND = 64  # a prefill chunk attends over its row's slots rounded up to this (not the whole row)


@dataclass
class EngineOptions:
    """Per-model engine settings."""

    max_batch: int = 8  # decode slots (rows of the slot cache)
    max_queue: int = 64  # waiting requests beyond which submit() raises QueueFull
    max_context: int | None = None  # slot length; default: the model's context limit, capped at 4096
    prefill_chunk: int = 256  # a long prompt is prefilled this many tokens per scheduler iteration
    prefix_cache_tokens: int = 8192  # budget of cached prompt-prefix KV (0 disables the prefix cache)
    compile: bool | None = None  # as generate(): None = auto (packed quantized decoders compile)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"EngineOptions.{name}={value!r} must be an integer >= 1")
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 2):
            raise UsageError(f"EngineOptions.max_context={self.max_context!r} must be an integer >= 2 or None")
        if not isinstance(self.prefix_cache_tokens, int) or self.prefix_cache_tokens < 0:
            raise UsageError(f"EngineOptions.prefix_cache_tokens={self.prefix_cache_tokens!r} must be >= 0")


class _Row:
    """A request in a row of the slot cache: its decoding state from admission to finish."""

    def __init__(self, handle: Handle, engine: Engine) -> None:
        req = handle.request
        self.handle = handle
        self.prompt = list(req.prompt_ids)
        self.config = config = req.config
        self.eos = set(resolve_eos(config, engine.model, engine.tokenizer))
        self.processors: list[LogitsProcessor] = []
        if config.json_schema is not None:
            self.processors.append(JsonSchemaProcessor(config.json_schema, engine.tokenizer, tuple(self.eos)))
        self.processors += build_processors(config, prompt_len=len(self.prompt)) + list(req.processors)
        device = engine.device
        self.generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
        self.text = TextStream(engine.tokenizer, config.stop, req.skip_special_tokens) if engine.tokenizer else None
        self.ids: list[int] = list(self.prompt)  # prompt + generated (what processors see)
        self.prefilled = 0  # prompt tokens in the row's cache
        self.cached = 0  # of which came from the prefix cache
        self.generated = 0
        self.next_token = -1  # the token the next decode step feeds (once prefilled)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)

    @property
    def simple_greedy(self) -> bool:
        """Greedy with nothing to apply per row: its token comes from the batch's one argmax."""
        return self.config.greedy and not self.processors and not self.config.wants_logprobs


class Engine:
    """Serves one decoder-only causal model to many concurrent requests (see the module doc)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, options: EngineOptions | None = None) -> None:
        if getattr(model, "is_encoder_decoder", False) or not hasattr(model, "decode"):
            raise UsageError(
                f"the engine serves decoder-only causal models; {type(model).__name__} is not one "
                "(run encoder-decoders through qkv.generation.text.complete)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.options = opts = options or EngineOptions()
        limit = model.config.context_limit
        self.max_context = opts.max_context or min(limit or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)
        if limit is not None and self.max_context > limit:
            raise UsageError(f"EngineOptions.max_context={self.max_context} exceeds the model's context of {limit}")
        self.device = model.device
        self.compile = auto_compile(model) if opts.compile is None else opts.compile
        self._runner = StaticStep(model, compile=self.compile)  # prepares packed weights for the graph
        self.cache = model.new_cache(opts.max_batch, self.max_context, static=True)
        self.prefix = PrefixCache(opts.prefix_cache_tokens, PREFIX_BLOCK)
        B = opts.max_batch
        self._tokens = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.rows: list[_Row | None] = [None] * B
        self.queue: deque[Handle] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._abort_all = False
        # Counters (read by stats()).
        self.tokens_generated = self.prompt_tokens = self.cached_tokens = 0
        self.requests_finished = self.requests_aborted = 0
        self.ttft: deque[float] = deque(maxlen=1000)
        self.step_seconds: deque[float] = deque(maxlen=1000)
        self.durations: deque[float] = deque(maxlen=64)

    # -- the public side -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler thread."""
        if self._thread is not None:
            raise UsageError("the engine has been started already")
        # OpenMP keeps its thread count per thread: the scheduler uses the caller's (torch's setting).
        self._thread = threading.Thread(
            target=self._run, args=(torch.get_num_threads(),), name="qkv-engine", daemon=True
        )
        self._thread.start()

    def warmup(self) -> float:
        """Run the decode step once before `start` (compiling it when the engine compiles: about a
        minute on 2 cores the first time, seconds once the compile cache holds it), so the first
        requests do not wait for it; return the seconds it took. Free rows only get garbage."""
        if self._thread is not None:
            raise UsageError("warmup() runs before start(), while no request holds a row")
        begin = time.perf_counter()
        with torch.no_grad():
            self._step()
        return time.perf_counter() - begin

    def stop(self, abort: bool = True, timeout: float = 10.0) -> None:
        """Stop the scheduler: abort in-flight requests (abort=True), or let them finish first
        (abort=False; those still running after `timeout` s are aborted). Joins the thread."""
        with self._lock:
            self._stopping = True
            self._abort_all = abort
            self._lock.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._abort_all = True
                self._lock.notify_all()
            self._thread.join(timeout)

    def submit(self, request: Request) -> Handle:
        """Validate and queue a request; UsageError for a bad one, QueueFull when the queue is full."""
        self._validate(request)
        handle = Handle(request, self._wake)
        with self._lock:
            if self._stopping or self._thread is None:
                raise UsageError("the engine is not running: call start() first (or it has been stopped)")
            if len(self.queue) >= self.options.max_queue:
                raise QueueFull(self._retry_after(), len(self.queue))
            self.queue.append(handle)
            self._lock.notify_all()
        return handle

    def stats(self) -> EngineStats:
        """Load and counters now."""
        with self._lock:
            return EngineStats(
                queue_depth=len(self.queue),
                active_slots=sum(row is not None for row in self.rows),
                max_batch=self.options.max_batch,
                tokens_generated=self.tokens_generated,
                prompt_tokens=self.prompt_tokens,
                cached_tokens=self.cached_tokens,
                requests_finished=self.requests_finished,
                requests_aborted=self.requests_aborted,
                ttft_seconds=list(self.ttft),
                step_seconds=list(self.step_seconds),
            )

    def _validate(self, request: Request) -> None:
        config, ids = request.config, request.prompt_ids
        if not isinstance(config, GenerationConfig):
            raise UsageError(f"Request.config must be a GenerationConfig, got {type(config).__name__}")
        if config.num_beams > 1 or config.num_return_sequences > 1:
            raise UsageError(
                "the engine decodes one sequence per request without beams: submit n separate Requests "
                "(num_return_sequences), and run beam search through qkv.generation.text.complete"
            )
        if not ids:
            raise UsageError("the prompt is empty; give at least one token (e.g. the BOS token)")
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
        if bad:
            raise UsageError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if len(ids) + config.max_new_tokens > self.max_context:
            raise UsageError(
                f"prompt of {len(ids)} tokens + max_new_tokens={config.max_new_tokens} = "
                f"{len(ids) + config.max_new_tokens} exceeds the engine's context of {self.max_context} tokens; "
                "shorten the prompt or ask for fewer tokens"
            )
        if (config.stop or config.json_schema is not None) and self.tokenizer is None:
            raise UsageError("stop strings and json_schema work on text: give the engine a tokenizer")
        if config.json_schema is not None:  # the grammar engine checks the schema and the tokenizer
            JsonSchemaProcessor(config.json_schema, self.tokenizer, resolve_eos(config, self.model, self.tokenizer))

    def _retry_after(self) -> float:
        """Seconds until a queue slot is likely free: the mean request time per row's share of the queue."""
        mean = sum(self.durations) / len(self.durations) if self.durations else 1.0
        return round(max(0.1, mean * (len(self.queue) + 1) / self.options.max_batch), 2)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- the scheduler ---------------------------------------------------------------------------
    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        with torch.no_grad():  # grad mode is per thread
            while self._wait_for_work():
                try:
                    self._iteration()
                except Exception as exc:  # never leave clients hanging on a dead thread
                    for i, row in enumerate(self.rows):
                        if row is not None:
                            self._finish(i, "error", error=f"{type(exc).__name__}: {exc}")
        for i, row in enumerate(self.rows):
            if row is not None:
                self._finish(i, "abort")
        with self._lock:
            left, self.queue = list(self.queue), deque()
        for handle in left:
            self._finish_unstarted(handle, "abort")

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False when the loop should end."""
        with self._lock:
            while True:
                busy = any(row is not None for row in self.rows)
                if self._stopping and (self._abort_all or (not busy and not self.queue)):
                    return False
                if busy or self.queue:
                    return True
                self._lock.wait()

    def _iteration(self) -> None:
        for i, row in enumerate(self.rows):
            if row is not None and row.handle.aborted:
                self._finish(i, "abort")
        with self._lock:  # aborted while waiting: answered now, not when a row frees up
            gone = [handle for handle in self.queue if handle.aborted]
            if gone:
                self.queue = deque(handle for handle in self.queue if not handle.aborted)
        for handle in gone:
            self._finish_unstarted(handle, "abort")
        self._admit()
        self._prefill()
        if any(row is not None and row.decoding for row in self.rows):
            self._decode()

    def _admit(self) -> None:
        """Move waiting requests into free rows, with their cached prefix copied in."""
        while None in self.rows:
            with self._lock:
                if not self.queue:
                    return
                handle = self.queue.popleft()
            if handle.aborted:
                self._finish_unstarted(handle, "abort")
                continue
            i = self.rows.index(None)
            try:
                row = _Row(handle, self)
                usable = (len(row.prompt) - 1) // PREFIX_BLOCK * PREFIX_BLOCK  # leave a token to prefill
                blocks = self.prefix.lookup(row.prompt, usable)
                row.cached = row.prefilled = self.prefix.copy_into(blocks, self.cache, i)
            except Exception as exc:
                self._finish_unstarted(handle, "error", f"{type(exc).__name__}: {exc}")
                continue
            self.rows[i] = row

    def _prefill(self) -> None:
        """Prefill chunks (at most `prefill_chunk` tokens each, one per row), oldest rows first,
        until this iteration's `prefill_chunk` tokens are spent (at least one chunk runs)."""
        budget = self.options.prefill_chunk
        waiting = [i for i, row in enumerate(self.rows) if row is not None and not row.decoding]
        for i in sorted(waiting, key=lambda i: self.rows[i].handle.submitted):
            if budget <= 0:
                return
            row = self.rows[i]
            start = row.prefilled
            end = min(len(row.prompt), start + self.options.prefill_chunk)
            budget -= end - start
            try:
                view = self.cache.row_view(i, min(-(-end // PREFILL_ROUND) * PREFILL_ROUND, self.cache.max_len))
                chunk = torch.tensor([row.prompt[start:end]], device=self.device)
                positions = torch.arange(start, end, device=self.device)
                logits = self.model.decode(chunk, view, input_pos=positions, logits_to_keep=1)[:, -1]
                row.prefilled = end
                if row.decoding:
                    self.prefix.insert(row.prompt, self.cache, i)
                    self.ttft.append(time.perf_counter() - row.handle.submitted)
                    self._sample(i, logits)
            except Exception as exc:
                self._finish(i, "error", error=f"{type(exc).__name__}: {exc}")

    def _decode(self) -> None:
        """One decode step [max_batch, 1] for every decoding row, then each row's next token."""
        decoding = [i for i, row in enumerate(self.rows) if row is not None and row.decoding]
        tokens = [0] * len(self.rows)
        positions = [0 if row is None else row.prefilled for row in self.rows]  # see the module doc, 3.
        for i in decoding:
            row = self.rows[i]
            tokens[i], positions[i] = row.next_token, len(row.ids) - 1
        self._tokens.copy_(torch.tensor(tokens)[:, None])
        self._positions.copy_(torch.tensor(positions)[:, None])
        start = time.perf_counter()
        try:
            logits = self._step()
        except Exception as exc:
            for i in decoding:
                self._finish(i, "error", error=f"decode step failed: {type(exc).__name__}: {exc}")
            return
        self.step_seconds.append(time.perf_counter() - start)
        greedy = [i for i in decoding if self.rows[i].simple_greedy]
        if greedy:
            picked = logits[greedy].float().argmax(dim=-1).tolist()
            for i, token in zip(greedy, picked):
                self._emit(i, token)
        for i in decoding:
            if self.rows[i] is not None and not self.rows[i].simple_greedy:
                self._sample(i, logits[i : i + 1])

    def _step(self) -> torch.Tensor:
        """The model's step over the whole slot cache -> logits [max_batch, V]."""
        # eager, or compiled as `generate` compiles: ahead of time where it can (a package built
        # once per machine, loaded without re-tracing), else torch.compile
        return self._runner.logits(self._tokens, self._positions, self.cache)[:, -1]

    def _sample(self, i: int, logits: torch.Tensor) -> None:
        """Choose row i's next token from its logits [1, V] with the request's own options."""
        row = self.rows[i]
        try:
            raw = logits
            if row.processors:
                ids = torch.tensor([row.ids], device=self.device)
                for proc in row.processors:
                    logits = proc(logits, ids)
            token = int(sample_next_token(logits, row.generator, greedy=row.config.greedy)[0])
            logprob = top = None
            if row.config.wants_logprobs:
                logp = raw.float().log_softmax(dim=-1)[0]
                logprob = float(logp[token])
                if row.config.top_logprobs:
                    values, ids_ = logp.topk(row.config.top_logprobs)
                    top = list(zip(ids_.tolist(), values.tolist()))
        except Exception as exc:
            self._finish(i, "error", error=f"{type(exc).__name__}: {exc}")
            return
        self._emit(i, token, logprob, top)

    def _emit(self, i: int, token: int, logprob: float | None = None, top: list | None = None) -> None:
        """Stream row i's new token, then finish the row or queue the token for the next step."""
        row = self.rows[i]
        if token in row.eos:
            return self._finish(i, "stop")
        row.ids.append(token)
        row.generated += 1
        self.tokens_generated += 1
        last = row.generated >= row.config.max_new_tokens
        text = ""
        if row.text is not None:
            try:
                text = row.text.push(token) + (row.text.flush() if last else "")
            except Exception as exc:  # a tokenizer that cannot decode what was generated
                return self._finish(i, "error", error=f"{type(exc).__name__}: {exc}")
        row.handle._put(TokenEvent(token, text, logprob, top))
        if row.text is not None and row.text.stopped:
            return self._finish(i, "stop")
        if last:
            return self._finish(i, "length")
        row.next_token = token

    def _finish(self, i: int, reason: str, error: str | None = None) -> None:
        """End row i's request with a FinishEvent and free the row."""
        row = self.rows[i]
        self.rows[i] = None
        rest = row.text.flush() if row.text is not None and reason != "abort" else ""
        row.handle._put(FinishEvent(reason, len(row.prompt), row.generated, row.cached, error, rest))
        self._count(row.handle, reason, len(row.prompt), row.cached)

    def _finish_unstarted(self, handle: Handle, reason: str, error: str | None = None) -> None:
        handle._put(FinishEvent(reason, len(handle.request.prompt_ids), 0, 0, error))
        self._count(handle, reason, 0, 0)

    def _count(self, handle: Handle, reason: str, prompt_tokens: int, cached: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached
            if reason == "abort":
                self.requests_aborted += 1
            else:
                self.requests_finished += 1
                self.durations.append(time.perf_counter() - handle.submitted)
