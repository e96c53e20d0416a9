"""Load on loopback: many concurrent streaming clients, a quarter of them leaving mid-stream.

Every client that stays gets the same greedy tokens as the library gives its prompt alone; the
ones that leave have their requests aborted; afterwards no slot is held and /metrics reads idle.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from conftest import build_models, running
from qkv.generation.text import complete

TOPICS = ["cats", "dogs", "the sea", "rust", "bread", "winter", "music", "trains"]


@pytest.fixture(scope="module")
def load_server(chat_checkpoint, tiny_encoder, tiny_seq2seq):
    from qkv.serve.app import create_app

    models = build_models(chat_checkpoint, tiny_encoder, tiny_seq2seq, max_batch=8, max_queue=512)
    with running(create_app(models)) as url:
        yield url, models


async def stream_chat(client: httpx.AsyncClient, messages, max_tokens: int, leave_after: int | None) -> str | None:
    """The streamed reply's text, or None when the client left after `leave_after` chunks."""
    body = {"model": "chat", "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    text, chunks = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                return "".join(text)
            payload = json.loads(line[len("data: ") :])
            assert "error" not in payload, payload
            text.append(payload["choices"][0]["delta"].get("content") or "")
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return None  # leaving the block closes the connection mid-stream
    raise AssertionError("the stream ended without [DONE]")


def metric(text: str, name: str) -> float:
    match = re.search(rf'^{name}{{model="chat"}} (\S+)$', text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_idle(url: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics").text
        idle = all(metric(text, m) == 0 for m in ("qkv_queue_depth", "qkv_active_slots", "qkv_requests_in_flight"))
        if idle or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def run_load(url: str, models, clients: int, max_tokens: int) -> None:
    served = models["chat"]
    prompts = [[{"role": "user", "content": f"tell me about {TOPICS[i % len(TOPICS)]}"}] for i in range(clients)]
    alone = {}
    for m in prompts[: len(TOPICS)]:
        ids = served.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        alone[m[0]["content"]] = complete(served.model, served.tokenizer, ids, max_new_tokens=max_tokens).text
    leaving = set(range(0, clients, 4))  # a quarter of the clients leave after two chunks
    before = served.engine.stats()

    async def main():
        limits = httpx.Limits(max_connections=clients + 8)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(
                stream_chat(client, m, max_tokens, 2 if i in leaving else None) for i, m in enumerate(prompts)
            ))  # fmt: skip

    results = asyncio.run(main())
    for i, (m, text) in enumerate(zip(prompts, results)):
        if i in leaving:
            assert text is None
        else:
            assert text == alone[m[0]["content"]], (i, text)
    text = wait_idle(url)
    for name in ("qkv_queue_depth", "qkv_active_slots", "qkv_requests_in_flight"):
        assert metric(text, name) == 0, name
    after = served.engine.stats()
    assert after.active_slots == 0 and after.queue_depth == 0  # no slot leaks
    finished = after.requests_finished - before.requests_finished
    aborted = after.requests_aborted - before.requests_aborted
    assert finished + aborted == clients
    assert finished >= clients - len(leaving)  # a leaver whose request had just ended counts as finished
    assert aborted >= len(leaving) // 2, aborted  # most leavers were still generating
    assert metric(text, "qkv_tokens_per_second") > 0


def test_64_streams_a_quarter_leaving(load_server):
    url, models = load_server
    run_load(url, models, clients=64, max_tokens=12)


@pytest.mark.slow
def test_256_longer_streams_a_quarter_leaving(load_server):
    url, models = load_server
    run_load(url, models, clients=256, max_tokens=64)


def test_a_client_that_leaves_frees_its_slot_within_a_second(load_server):
    url, models = load_server
    engine = models["chat"].engine
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 200,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        next(lines)
        deadline = time.monotonic() + 10  # the first chunk (the role) can come before the request has its row
        while engine.stats().active_slots != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().active_slots == 1
        left = time.monotonic()
    while engine.stats().active_slots and time.monotonic() - left < 1.0:
        time.sleep(0.01)
    assert engine.stats().active_slots == 0, "the slot was still held a second after the client left"
