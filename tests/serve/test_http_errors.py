"""Every client mistake gets a 4xx in OpenAI's error shape, naming what was wrong; never a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import build_models, running

MESSAGES = [{"role": "user", "content": "hello"}]


def chat(**fields):
    return {"model": "chat", "messages": MESSAGES, "max_tokens": 2, **fields}


def assert_error(response: httpx.Response, status: int, param: str | None = None, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["type"] == ("rate_limit_error" if status == 429 else "invalid_request_error")
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error["message"]
    return error


BAD_CHAT = [
    (chat(n=0), "n", "n"),
    (chat(n=17), "n", "n"),
    (chat(temperature=-0.5), "temperature", "greater than or equal to 0"),
    (chat(top_p=0), "top_p", "greater than 0"),
    (chat(top_p=1.5), "top_p", "less than or equal to 1"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs", "less than or equal to 20"),
    (chat(top_logprobs=2), "top_logprobs", "logprobs=true"),
    (chat(messages=[]), "messages", "at least 1"),
    (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "wizard"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "5"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content", ""),
    (chat(messages=[{"role": "user"}]), "messages[0].content", "missing"),
    (chat(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (chat(max_tokens=201), "max_tokens", "cap of 200"),
    (chat(max_tokens=200, messages=[{"role": "user", "content": "hello there " * 40}]), "max_tokens", "context is 256"),
    (chat(logit_bias={"1": 2}), "logit_bias", "unrecognized"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     "response_format", "schema"),
    (chat(response_format={"type": "xml"}), "response_format", "xml"),
    ({"messages": MESSAGES}, "model", "missing"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param", "words"), BAD_CHAT, ids=[p for _, p, _ in BAD_CHAT])
def test_bad_chat_parameters_are_400_naming_them(server, body, param, words):
    assert_error(httpx.post(f"{server}/v1/chat/completions", json=body), 400, param, words)


def test_the_context_message_has_the_numbers(server):
    body = chat(max_tokens=200, messages=[{"role": "user", "content": "hello there " * 40}])
    error = assert_error(httpx.post(f"{server}/v1/chat/completions", json=body), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    assert "256 tokens" in error["message"] and "max_tokens=200" in error["message"]


@pytest.mark.parametrize(
    ("content", "words"),
    [(b'{"model": "chat", "messages": [', "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "")],
)
def test_malformed_json_is_400(server, content, words):
    r = httpx.post(f"{server}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400, None, words)


BAD_COMPLETIONS = [
    ({"model": "chat", "prompt": [], "max_tokens": 2}, "prompt", ""),
    ({"model": "chat", "prompt": [[1, 2], []], "max_tokens": 2}, "prompt", ""),
    ({"model": "chat", "prompt": [5, 10_000], "max_tokens": 2}, "prompt", "outside the vocabulary"),
    ({"model": "chat", "prompt": "hi", "best_of": 2, "n": 2}, "n", "n must be 1"),
    ({"model": "chat", "prompt": "hi", "best_of": 2, "stream": True}, "stream", "cannot stream"),
    ({"model": "chat", "prompt": "hi", "qkv": {"num_beams": 2}, "logprobs": 1}, None, "logprobs"),
    ({"model": "chat", "prompt": "hi", "qkv": {"length_penalty": 2.0}}, None, "num_beams > 1"),
    ({"model": "chat", "prompt": "hi", "echo": True, "logprobs": 1}, "echo", "echo"),
    ({"model": "chat", "prompt": "hi", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"model": "bert", "prompt": "hi"}, "model", "encoder"),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_COMPLETIONS, ids=[str(b) for b, _, _ in BAD_COMPLETIONS])
def test_bad_completion_parameters_are_400(server, body, param, words):
    assert_error(httpx.post(f"{server}/v1/completions", json=body), 400, param, words)


BAD_EMBEDDINGS = [
    ({"model": "bert", "input": []}, "input", ""),
    ({"model": "bert", "input": [1, 10_000]}, "input", "outside the vocabulary"),
    ({"model": "bert", "input": [[1] * 129]}, "input", "129 tokens"),
    ({"model": "bert", "input": "x", "encoding_format": "int8"}, "encoding_format", "int8"),
    ({"model": "bert", "input": "x", "dimensions": 8}, "dimensions", "unrecognized"),
    ({"model": "chat", "input": "x"}, "model", "decoder"),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_EMBEDDINGS, ids=[str(b) for b, _, _ in BAD_EMBEDDINGS])
def test_bad_embedding_parameters_are_400(server, body, param, words):
    assert_error(httpx.post(f"{server}/v1/embeddings", json=body), 400, param, words)


def test_a_seq2seq_model_cannot_chat(server):
    assert_error(httpx.post(f"{server}/v1/chat/completions", json=chat(model="t5")), 400, "model", "seq2seq")


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions", "embeddings"])
def test_unknown_model_is_404(server, endpoint):
    body = {"model": "gpt-9", "messages": MESSAGES, "prompt": "hi", "input": "hi"}
    body = {k: v for k, v in body.items() if k in ("model", {"chat/completions": "messages", "completions": "prompt",
                                                              "embeddings": "input"}[endpoint])}  # fmt: skip
    error = assert_error(httpx.post(f"{server}/v1/{endpoint}", json=body), 404, "model", "gpt-9", "chat, bert, t5")
    assert error["code"] == "model_not_found"
    assert_error(httpx.get(f"{server}/v1/models/gpt-9"), 404, "model")


def test_unknown_route_and_method_are_openai_shaped(server):
    assert_error(httpx.get(f"{server}/v1/nothing"), 404, None, "/v1/nothing")
    assert_error(httpx.get(f"{server}/v1/chat/completions"), 405, None, "GET")


def test_oversized_body_is_413_before_it_is_read(server):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 70_000}])).encode()
    r = httpx.post(f"{server}/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert_error(r, 413, None, "65536 bytes")

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(f"{server}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, None, "65536 bytes")


@pytest.fixture(scope="module")
def keyed_server(chat_checkpoint, tiny_encoder, tiny_seq2seq):
    from qkv.serve.app import ServeOptions, create_app

    app = create_app(build_models(chat_checkpoint, tiny_encoder, tiny_seq2seq), ServeOptions(api_key="sesame"))
    with running(app) as url:
        yield url


def test_api_key(keyed_server):
    url = f"{keyed_server}/v1/chat/completions"
    assert_error(httpx.post(url, json=chat()), 401, None, "missing API key")
    assert_error(httpx.post(url, json=chat(), headers={"Authorization": "Bearer wrong"}), 401, None, "incorrect")
    assert_error(httpx.get(f"{keyed_server}/v1/models"), 401)
    assert httpx.post(url, json=chat(), headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert httpx.get(f"{keyed_server}/health").status_code == 200  # liveness needs no key


@pytest.fixture(scope="module")
def tiny_queue_server(chat_checkpoint, tiny_encoder, tiny_seq2seq):
    from qkv.serve.app import create_app

    models = build_models(chat_checkpoint, tiny_encoder, tiny_seq2seq, max_batch=1, max_queue=1)
    with running(create_app(models)) as url:
        yield url


def test_a_full_queue_is_429_with_retry_after(tiny_queue_server):
    import asyncio

    async def burst():
        async with httpx.AsyncClient(base_url=tiny_queue_server, timeout=60) as client:
            body = {"model": "chat", "messages": MESSAGES, "max_tokens": 100, "temperature": 0}
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(16)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    # At most one decoding and one waiting are admitted; whether the first has left the queue for
    # the batch when the others arrive depends on timing, so one or two succeed. The rest are refused.
    assert 1 <= statuses.count(200) <= 2 and statuses.count(429) >= 14, statuses
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429, None, "queue is full")
            assert int(r.headers["retry-after"]) >= 1


def test_a_full_worker_queue_is_429(chat_checkpoint, tiny_encoder, tiny_seq2seq):
    from qkv.serve.app import create_app

    models = build_models(chat_checkpoint, tiny_encoder, tiny_seq2seq)
    models["bert"].max_pending = 0  # as if the encoder's worker had a full queue
    models["t5"].max_pending = 0
    with running(create_app(models)) as url:
        for endpoint, body in (
            ("embeddings", {"model": "bert", "input": "x"}),
            ("completions", {"model": "t5", "prompt": "x"}),
        ):
            r = httpx.post(f"{url}/v1/{endpoint}", json=body)
            assert_error(r, 429, None, "queue is full")
            assert r.headers["retry-after"] == "1"
        assert (
            httpx.post(f"{url}/v1/completions", json={"model": "chat", "prompt": "x", "max_tokens": 1}).status_code
            == 200
        )
