"""The continuous-batching engine: every request decodes as it would alone, whatever runs beside it."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

from qkv.errors import UsageError
from qkv.generation import generate
from qkv.generation.options import GenerationConfig
from qkv.generation.text import complete
from qkv.serve import Engine, EngineOptions, FinishEvent, QueueFull, Request, TokenEvent
from qkv.serve.prefix import PrefixCache
from qkv.tokenizer import train_tokenizer
from tiny_models import random_ids, tiny_model

CORPUS = ['{"name": "Ann", "age": 31, "tags": ["a", "b"], "ok": true}', "Hello world, 123 ünïcödé 👍 text."] * 20


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny-llama")


@pytest.fixture
def engine_of():
    """engine_of(model, tokenizer=None, **options): a started engine, stopped after the test."""
    engines = []

    def make(model, tokenizer=None, **options):
        engine = Engine(model, tokenizer, EngineOptions(**{"max_context": 128, "prefill_chunk": 16, **options}))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def collect(handle, timeout: float = 60.0) -> tuple[list[TokenEvent], FinishEvent]:
    events = list(handle.events(timeout=timeout))
    return events[:-1], events[-1]


def token_ids(handle) -> list[int]:
    return [e.token_id for e in collect(handle)[0]]


def alone(model, prompt: list[int], n: int, **options) -> list[int]:
    return generate(model, torch.tensor([prompt]), max_new_tokens=n, **options)[0, len(prompt) :].tolist()


def prompt(n: int, seed: int | None = None) -> list[int]:
    return random_ids(512, 1, n, seed=n if seed is None else seed)[0].tolist()


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_greedy_requests_equal_generate_alone_whatever_runs_beside_them(model, engine_of):
    """Prompts of different lengths (one over prefill_chunk) submitted at staggered times, more of
    them than rows, beside requests aborted mid-way: each gives generate()'s tokens alone."""
    engine = engine_of(model, max_batch=4)
    lengths = [3, 40, 9, 17, 5, 60, 11]
    handles, doomed = [], []
    for k, n in enumerate(lengths):
        handles.append(engine.submit(Request(prompt(n), GenerationConfig(max_new_tokens=20 + k))))
        if k % 3 == 0:  # held at its third token until the test has aborted it
            gate = threading.Event()
            hold = lambda logits, ids, gate=gate: logits if ids.shape[1] < 9 else gate.wait(30) and logits  # noqa: E731
            doomed.append(
                (
                    engine.submit(Request(prompt(7, seed=k), GenerationConfig(max_new_tokens=90), processors=[hold])),
                    gate,
                )
            )
        time.sleep(0.01 * k)
    for handle, gate in doomed:
        events = handle.events(timeout=60)
        assert all(isinstance(next(events), TokenEvent) for _ in range(2))
        handle.abort()
        gate.set()
    doomed = [handle for handle, _ in doomed]
    for k, (n, handle) in enumerate(zip(lengths, handles)):
        events, finish = collect(handle)
        assert [e.token_id for e in events] == alone(model, prompt(n), 20 + k), n
        assert (finish.reason, finish.prompt_tokens, finish.completion_tokens) == ("length", n, 20 + k)
    for handle in doomed:
        *_, finish = handle.events(timeout=60)
        assert finish.reason == "abort" and finish.completion_tokens < 90
    wait_until(lambda: engine.stats().active_slots == 0)
    stats = engine.stats()
    assert stats.requests_finished == len(lengths) and stats.requests_aborted == len(doomed)
    assert stats.queue_depth == 0 and len(stats.ttft_seconds) == len(lengths) + len(doomed)


def test_sampled_request_with_a_seed_is_the_same_alone_and_in_a_crowd(model, engine_of):
    options = dict(temperature=0.9, top_k=40, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.3, seed=7)
    config = GenerationConfig(max_new_tokens=24, **options)
    engine = engine_of(model, max_batch=4)
    solo = token_ids(engine.submit(Request(prompt(12), config)))
    crowd = [engine.submit(Request(prompt(n), GenerationConfig(max_new_tokens=30, temperature=1.0))) for n in (5, 30)]
    mine = engine.submit(Request(prompt(12), config))
    crowd.append(engine.submit(Request(prompt(9), GenerationConfig(max_new_tokens=30, temperature=1.0, seed=3))))
    assert token_ids(mine) == solo
    assert solo == alone(model, prompt(12), 24, **options)  # and generate() draws the same
    other = token_ids(engine.submit(Request(prompt(12), GenerationConfig(max_new_tokens=24, **{**options, "seed": 8}))))
    assert other != solo
    for handle in crowd:
        assert collect(handle)[1].reason == "length"


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_stream(model, engine_of):
    """A 120-token prompt with prefill_chunk=16 takes 8 iterations; the running stream gets a
    token from each of them instead of waiting for the whole prompt."""
    engine = engine_of(model, max_batch=2, max_context=256)
    running = engine.submit(Request(prompt(4), GenerationConfig(max_new_tokens=150)))
    times: list[float] = []

    def consume() -> None:
        times.extend(time.perf_counter() for e in running.events(timeout=60) if isinstance(e, TokenEvent))

    consumer = threading.Thread(target=consume)
    consumer.start()
    wait_until(lambda: len(times) >= 3)
    submitted = time.perf_counter()
    long = engine.submit(Request(prompt(120), GenerationConfig(max_new_tokens=3)))
    first = next(iter(long.events(timeout=60)))
    first_at = time.perf_counter()
    consumer.join()
    assert isinstance(first, TokenEvent)
    during = [t for t in times if submitted < t < first_at]
    assert len(during) >= 6, f"{len(during)} tokens of the other stream while the long prompt prefilled"
    assert [first.token_id, *token_ids(long)] == alone(model, prompt(120), 3)


def test_prefix_cache_reuses_a_shared_prompt_exactly(model, engine_of):
    engine = engine_of(model, max_batch=2, prefix_cache_tokens=64)
    system = prompt(40, seed=1)
    first, second = system + prompt(5, seed=2), system + prompt(9, seed=3)
    h1 = engine.submit(Request(first, GenerationConfig(max_new_tokens=12)))
    events, finish1 = collect(h1)
    assert finish1.cached_tokens == 0
    h2 = engine.submit(Request(second, GenerationConfig(max_new_tokens=12)))
    events2, finish2 = collect(h2)
    assert finish2.cached_tokens == 32  # two whole 16-token blocks of the 40 shared tokens
    assert [e.token_id for e in events2] == alone(model, second, 12)
    again = engine.submit(Request(first, GenerationConfig(max_new_tokens=12)))
    events3, finish3 = collect(again)
    assert finish3.cached_tokens == 32  # the whole prompt's blocks, but only 64 tokens fit the budget
    assert [e.token_id for e in events3] == [e.token_id for e in events] == alone(model, first, 12)
    assert engine.stats().cached_tokens == 64


def test_without_the_prefix_cache_nothing_is_cached(model, engine_of):
    engine = engine_of(model, max_batch=2, prefix_cache_tokens=0)
    ids = prompt(40)
    for _ in range(2):
        assert collect(engine.submit(Request(ids, GenerationConfig(max_new_tokens=2))))[1].cached_tokens == 0


def test_prefix_cache_is_an_lru_that_evicts_leaves_first(model):
    cache = model.new_cache(1, 64, static=True)
    for layer in range(len(cache.k)):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    prefixes = PrefixCache(budget_tokens=48, block=16)
    a, b = list(range(40)), list(range(32)) + [99] * 16
    prefixes.insert(a, cache, 0)  # blocks a0, a1
    assert prefixes.tokens == 32
    blocks = prefixes.lookup([*a, 7], limit=41)
    assert len(blocks) == 2 and torch.equal(blocks[1][0, 0], cache.k[0][0, :, 16:32])
    prefixes.insert(b, cache, 0)  # shares a0, a1; adds b2
    assert prefixes.tokens == 48
    prefixes.insert([5] * 16, cache, 0)  # over budget: the least recent leaf (b2) goes, not a parent
    assert len(prefixes.lookup(b, limit=48)) == 2 and len(prefixes.lookup(a, limit=32)) == 2
    assert len(prefixes.lookup([5] * 16, limit=16)) == 1
    assert prefixes.lookup(a, limit=15) == []  # less than one block is never reused


def test_abort_frees_the_row_within_a_step(model, engine_of):
    engine = engine_of(model, max_batch=1)
    handle = engine.submit(Request(prompt(6), GenerationConfig(max_new_tokens=100)))
    events = handle.events(timeout=30)
    next(events)
    handle.abort()
    handle.abort()  # idempotent
    rest = list(events)
    assert rest[-1].reason == "abort" and rest[-1].completion_tokens < 100
    # The freed row serves the next request, which decodes as it would alone.
    assert token_ids(engine.submit(Request(prompt(8), GenerationConfig(max_new_tokens=10)))) == alone(
        model, prompt(8), 10
    )


def test_stop_lets_in_flight_requests_finish_or_aborts_them(model):
    engine = Engine(model, None, EngineOptions(max_context=128))
    engine.start()
    handles = [engine.submit(Request(prompt(n), GenerationConfig(max_new_tokens=30))) for n in (4, 9)]
    engine.stop(abort=False)
    assert [collect(h)[1].reason for h in handles] == ["length", "length"]
    assert not engine._thread.is_alive()
    with pytest.raises(UsageError, match="not running"):
        engine.submit(Request(prompt(4), GenerationConfig()))
    engine = Engine(model, None, EngineOptions(max_context=128))
    engine.start()
    handle = engine.submit(Request(prompt(4), GenerationConfig(max_new_tokens=100)))
    next(handle.events(timeout=30))
    engine.stop()
    assert collect(handle)[1].reason == "abort" and not engine._thread.is_alive()


def test_a_full_queue_raises_queue_full_with_retry_after(model, engine_of):
    engine = engine_of(model, max_batch=1, max_queue=2)
    slow = lambda logits, ids: time.sleep(0.005) or logits  # noqa: E731 (100 tokens: ~0.5 s)
    busy = engine.submit(Request(prompt(4), GenerationConfig(max_new_tokens=100), processors=[slow]))
    next(busy.events(timeout=30))  # admitted: the queue is empty again
    waiting = [engine.submit(Request(prompt(4), GenerationConfig(max_new_tokens=2))) for _ in range(2)]
    with pytest.raises(QueueFull, match="queue is full") as caught:
        engine.submit(Request(prompt(4), GenerationConfig(max_new_tokens=2)))
    assert caught.value.retry_after > 0
    assert engine.stats().queue_depth == 2
    waiting[0].abort()  # a waiting request is answered at once, not when the busy row frees
    assert collect(waiting[0])[1].reason == "abort"
    assert engine.stats().queue_depth == 1 and engine.stats().active_slots == 1
    busy.abort()
    assert collect(waiting[1])[1].reason == "length"


@pytest.mark.parametrize(
    ("prompt_ids", "config", "message"),
    [
        (list(range(3, 103)), GenerationConfig(max_new_tokens=40), r"100 tokens \+ max_new_tokens=40 = 140 .* 128"),
        ([], GenerationConfig(), "prompt is empty"),
        ([5, 512], GenerationConfig(), r"512 is outside the vocabulary \[0, 512\)"),
        ([5], GenerationConfig(num_beams=2), "beam"),
        ([5], GenerationConfig(stop=("x",)), "tokenizer"),
    ],
)
def test_bad_requests_fail_in_submit(model, engine_of, prompt_ids, config, message):
    engine = engine_of(model)
    with pytest.raises(UsageError, match=message):
        engine.submit(Request(prompt_ids, config))


def test_an_error_in_one_request_fails_it_alone(model, engine_of):
    calls = []

    def breaks_on_third_call(logits, ids):
        calls.append(ids.shape[1])
        if len(calls) == 3:
            raise RuntimeError("processor broke")
        return logits

    engine = engine_of(model, max_batch=3)
    good = [engine.submit(Request(prompt(n), GenerationConfig(max_new_tokens=15))) for n in (5, 8)]
    bad = engine.submit(Request(prompt(6), GenerationConfig(max_new_tokens=15), processors=[breaks_on_third_call]))
    events, finish = collect(bad)
    assert (finish.reason, finish.completion_tokens, len(events)) == ("error", 2, 2)
    assert "RuntimeError: processor broke" in finish.error
    assert calls == [6, 7, 8]  # the processor saw the prompt, then each generated token
    for n, handle in zip((5, 8), good):
        assert token_ids(handle) == alone(model, prompt(n), 15)


@pytest.fixture(scope="module")
def byte_level():
    return train_tokenizer(kind="bpe", texts=CORPUS, vocab_size=320, show_progress=False)


@pytest.fixture(scope="module")
def text_model(byte_level):
    model = tiny_model("tiny-gpt2", vocab_size=byte_level.vocab_size, max_seq_len=128, eos_token_id=0)
    model.tokenizer = byte_level
    return model


def as_completion(events: list[TokenEvent], finish: FinishEvent) -> tuple[str, list[int], str]:
    return "".join(e.text for e in events) + finish.text, [e.token_id for e in events], finish.reason


@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=25),
        dict(max_new_tokens=40, stop=(" ",)),
        dict(max_new_tokens=25, temperature=0.8, seed=5, logprobs=True, top_logprobs=3),
        dict(max_new_tokens=60, json_schema={"type": "object", "properties": {"age": {"type": "integer"}}}),
    ],
)
def test_text_stop_strings_logprobs_and_json_schema_equal_complete(text_model, byte_level, engine_of, options):
    """Events spell complete()'s text and tokens, finish for the same reason, and carry its logprobs."""
    engine = engine_of(text_model, byte_level, max_batch=3)
    text = byte_level.encode("Hello world, ")
    crowd = [engine.submit(Request(byte_level.encode(t), GenerationConfig(max_new_tokens=30))) for t in ("ok", "a b c")]
    events, finish = collect(engine.submit(Request(text, GenerationConfig(**options))))
    ref = complete(text_model, byte_level, text, **options)
    assert as_completion(events, finish) == (ref.text, ref.token_ids, ref.finish_reason)
    if ref.logprobs is not None:
        for event, record in zip(events, ref.logprobs, strict=True):
            assert event.logprob == pytest.approx(record["logprob"], abs=1e-5)
            assert [i for i, _ in event.top_logprobs] == [t["id"] for t in record["top"]]
    if "json_schema" in options and finish.reason == "stop":
        assert isinstance(json.loads(ref.text), dict)
    for handle in crowd:
        assert collect(handle)[1].reason in ("length", "stop")


def test_aevents_streams_to_asyncio(model, engine_of):
    engine = engine_of(model, max_batch=4)

    async def run() -> list[list[int]]:
        async def one(n: int) -> list[int]:
            handle = engine.submit(Request(prompt(n), GenerationConfig(max_new_tokens=10)))
            return [e.token_id async for e in handle.aevents() if isinstance(e, TokenEvent)]

        return await asyncio.gather(*(one(n) for n in (3, 7, 12)))

    assert asyncio.run(run()) == [alone(model, prompt(n), 10) for n in (3, 7, 12)]


def test_encoder_decoders_are_refused():
    from qkv import EncoderDecoder, ModelConfig

    with pytest.raises(UsageError, match="decoder-only"):
        Engine(EncoderDecoder(ModelConfig.from_name("tiny-t5")).eval(), None)


@pytest.mark.parametrize("compile", [False, pytest.param(None, marks=pytest.mark.slow)])
def test_packed_quantized_model_through_the_compiled_step(monkeypatch, compile):
    """A packed int4 bfloat16 model decodes through the compiled [max_batch, 1] step (compile=None
    picks it: ~20-30 s to compile on 2 cores, so marked slow) or eagerly (the C attention kernel
    from batch 4 on); each request gives the tokens generate() gives alone."""
    from qkv.generation import aot_step, static_step
    from qkv.nn.quant import quantize_model

    monkeypatch.delenv("QKV_COMPILE", raising=False)
    model = quantize_model(tiny_model("tiny-llama", d_model=64, n_heads=4, n_kv_heads=2, d_ff=128), "int4")
    model.to(torch.bfloat16)
    engine = Engine(model, None, EngineOptions(max_batch=4, max_context=64, prefill_chunk=16, compile=compile))
    assert engine.compile == (compile is None)
    assert engine.warmup() > 0
    aot = any(isinstance(step, aot_step.AotStep) for step in aot_step._STEPS.get(model, {}).values())
    assert (aot or model in static_step._COMPILED) == engine.compile  # the AOT package, else torch.compile
    engine.start()
    with pytest.raises(UsageError, match="before start"):
        engine.warmup()
    try:
        handles = [engine.submit(Request(prompt(n), GenerationConfig(max_new_tokens=12))) for n in (6, 20, 9)]
        got = [token_ids(h) for h in handles]
    finally:
        engine.stop()
    assert got == [alone(model, prompt(n), 12, compile=engine.compile) for n in (6, 20, 9)]
