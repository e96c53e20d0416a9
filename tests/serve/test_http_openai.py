"""The official `openai` client, sync, async and streaming, against `qkv serve`'s app on loopback:
every answer parses as OpenAI's types, and greedy tokens equal the library's own `complete`."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch

from qkv.embedding import embed
from qkv.generation.text import complete

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def chat_ids(models, messages) -> list[int]:
    tok = models["chat"].tokenizer
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def reference(models, name: str, prompt, **options):
    served = models[name]
    return complete(served.model, served.tokenizer, prompt, **options)


def test_models_health_and_metrics(client, server):
    assert sorted(m.id for m in client.models.list().data) == ["bert", "chat", "t5"]
    assert client.models.retrieve("t5").id == "t5"
    health = httpx.get(f"{server}/health").json()
    assert health == {"status": "ok", "models": {"chat": "decoder", "bert": "encoder", "t5": "seq2seq"}}
    text = httpx.get(f"{server}/metrics").text
    assert 'qkv_queue_depth{model="chat"} 0' in text and 'qkv_max_batch{model="chat"} 4' in text
    assert "# TYPE qkv_time_to_first_token_seconds histogram" in text


def test_chat_greedy_equals_the_library(client, models):
    out = client.chat.completions.create(model="chat", messages=MESSAGES, temperature=0, max_tokens=12)
    ref = reference(models, "chat", chat_ids(models, MESSAGES), max_new_tokens=12)
    assert out.object == "chat.completion" and out.model == "chat"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text and ref.text
    assert out.choices[0].finish_reason == ref.finish_reason == "length"
    assert out.usage.prompt_tokens == ref.prompt_tokens and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == ref.prompt_tokens + 12


def test_chat_logprobs_equal_the_library(client, models):
    out = client.chat.completions.create(
        model="chat", messages=MESSAGES, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    ref = reference(models, "chat", chat_ids(models, MESSAGES), max_new_tokens=5, top_logprobs=3, logprobs=True)
    got = out.choices[0].logprobs.content
    assert [g.token for g in got] == [r["token"] for r in ref.logprobs]
    np.testing.assert_allclose([g.logprob for g in got], [r["logprob"] for r in ref.logprobs], atol=1e-4)
    for g, r in zip(got, ref.logprobs):
        assert [t.token for t in g.top_logprobs] == [t["token"] for t in r["top"]]
        assert g.bytes == list(g.token.encode())


def test_chat_streaming_sync_matches_non_streaming(client):
    whole = client.chat.completions.create(model="chat", messages=MESSAGES, temperature=0, max_tokens=10)
    stream = client.chat.completions.create(
        model="chat", messages=MESSAGES, temperature=0, max_tokens=10, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": "chat", "messages": MESSAGES, "temperature": 0, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[1][len("data: ") :])
    assert "usage" not in first and first["choices"][0]["finish_reason"] is None


def test_async_client_concurrent_requests_equal_alone(server, client):
    prompts = [[{"role": "user", "content": f"tell me about {w}"}] for w in ("cats", "dogs", "the sea", "rust")]
    alone = [
        client.chat.completions.create(model="chat", messages=m, temperature=0, max_tokens=8).choices[0].message.content
        for m in prompts
    ]

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as aclient:
            outs = await asyncio.gather(*(
                aclient.chat.completions.create(model="chat", messages=m, temperature=0, max_tokens=8) for m in prompts
            ))  # fmt: skip
            stream = await aclient.chat.completions.create(
                model="chat", messages=prompts[0], temperature=0, max_tokens=8, stream=True
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
        return [o.choices[0].message.content for o in outs], streamed

    texts, streamed = asyncio.run(together())
    assert texts == alone and streamed == alone[0]


def test_n_stop_and_seed(client, models):
    ids = chat_ids(models, MESSAGES)
    sampled = client.chat.completions.create(model="chat", messages=MESSAGES, n=3, seed=7, max_tokens=8)
    again = client.chat.completions.create(model="chat", messages=MESSAGES, n=3, seed=7, max_tokens=8)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    for i, choice in enumerate(sampled.choices):  # choice i samples with seed + i, as the library does
        ref = reference(models, "chat", ids, max_new_tokens=8, temperature=1.0, seed=7 + i)
        assert choice.message.content == ref.text
    assert sampled.usage.prompt_tokens == len(ids) and sampled.usage.completion_tokens == 24
    greedy = reference(models, "chat", ids, max_new_tokens=12).text
    stop = greedy.split()[1]
    out = client.chat.completions.create(model="chat", messages=MESSAGES, temperature=0, max_tokens=12, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == greedy[: greedy.index(stop)]


def test_cached_tokens_report_a_reused_prefix(client):
    system = {"role": "system", "content": "You are terse. " * 12}
    first = client.chat.completions.create(
        model="chat", messages=[system, {"role": "user", "content": "hello"}], temperature=0, max_tokens=2
    )
    second = client.chat.completions.create(
        model="chat", messages=[system, {"role": "user", "content": "there"}], temperature=0, max_tokens=2
    )
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens <= second.usage.prompt_tokens_details.cached_tokens


def test_response_format_json_schema(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    out = client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=40, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}},
    )  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    anything = client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=6, seed=0, response_format={"type": "json_object"}
    )
    assert anything.choices[0].message.content.startswith("{")


def test_completions_decoder_prompts_of_every_kind(client, models):
    tok = models["chat"].tokenizer
    ids = tok.encode("the quick brown")
    ref = reference(models, "chat", ids, max_new_tokens=6)
    by_text = client.completions.create(model="chat", prompt="the quick brown", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="chat", prompt=ids, max_tokens=6, temperature=0)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text == ref.text
    other = reference(models, "chat", tok.encode("hello"), max_new_tokens=6)
    many = client.completions.create(model="chat", prompt=["the quick brown", "hello"], max_tokens=6, temperature=0)
    assert [c.text for c in many.choices] == [ref.text, other.text]
    assert many.usage.prompt_tokens == len(ids) + len(tok.encode("hello"))
    echo = client.completions.create(model="chat", prompt="the quick brown", max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == "the quick brown" + ref.text
    default = client.completions.create(model="chat", prompt="the quick brown", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_completions_logprobs_and_streaming(client, models):
    ids = models["chat"].tokenizer.encode("hello")
    ref = reference(models, "chat", ids, max_new_tokens=5, top_logprobs=2, logprobs=True)
    out = client.completions.create(model="chat", prompt="hello", max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == [r["token"] for r in ref.logprobs]
    np.testing.assert_allclose(lp.token_logprobs, [r["logprob"] for r in ref.logprobs], atol=1e-4)
    assert [list(t) for t in lp.top_logprobs] == [[t["token"] for t in r["top"]] for r in ref.logprobs]
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    chunks = list(client.completions.create(model="chat", prompt="hello", max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_beam_search_through_best_of_and_the_qkv_object(client, models):
    ids = models["chat"].tokenizer.encode("the quick brown")
    ref = reference(models, "chat", ids, max_new_tokens=6, num_beams=3)
    assert ref.extra == {"num_beams": 3}
    best_of = client.completions.create(model="chat", prompt="the quick brown", max_tokens=6, best_of=3)
    ext = client.completions.create(
        model="chat", prompt="the quick brown", max_tokens=6, extra_body={"qkv": {"num_beams": 3}}
    )
    assert best_of.choices[0].text == ext.choices[0].text == ref.text


def test_seq2seq_completions_equal_the_library(client, models):
    ref = reference(models, "t5", "translate: hello there", max_new_tokens=8)
    out = client.completions.create(model="t5", prompt="translate: hello there", max_tokens=8, temperature=0)
    assert out.choices[0].text == ref.text and out.usage.completion_tokens == len(ref.token_ids)
    assert out.choices[0].finish_reason == ("stop" if ref.finish_reason == "stop" else "length")
    chunks = list(client.completions.create(model="t5", prompt="translate: hello there", max_tokens=8, temperature=0,
                                            stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == ref.text


def vectors(data) -> torch.Tensor:
    """The embeddings of a response: floats, or (asked for explicitly) base64 of float32 bytes."""
    import base64

    rows = [
        np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") if isinstance(d.embedding, str) else d.embedding
        for d in data
    ]
    return torch.tensor(np.array(rows, dtype=np.float32))


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_embeddings_equal_the_library(client, models, encoding_format):
    """None: the client's default, which asks for base64 and decodes it itself."""
    encoding_format = encoding_format or openai.omit
    served = models["bert"]
    texts = ["a cat sat", "def f(x): return x", ""]
    ref = embed(served.model, served.tokenizer, texts)
    out = client.embeddings.create(model="bert", input=texts, encoding_format=encoding_format)
    got = vectors(out.data)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert [d.index for d in out.data] == [0, 1, 2]
    ids = served.tokenizer.encode_batch(texts)
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(len(r) for r in ids)
    one = client.embeddings.create(model="bert", input="a cat sat", encoding_format=encoding_format)
    torch.testing.assert_close(vectors(one.data)[0], ref[0], atol=1e-5, rtol=1e-5)
    by_ids = client.embeddings.create(model="bert", input=ids[:2], encoding_format=encoding_format)
    torch.testing.assert_close(vectors(by_ids.data), ref[:2], atol=1e-5, rtol=1e-5)
    single = client.embeddings.create(model="bert", input=ids[0], encoding_format=encoding_format)
    torch.testing.assert_close(vectors(single.data)[0], ref[0], atol=1e-5, rtol=1e-5)


def test_logprob_bytes_are_the_tokens_own_bytes(models):
    """A token may hold part of a UTF-8 character: its bytes, not its decoded text, add up to the text."""
    served = models["chat"]
    text = "naïve café ✓ 日本"
    ids = served.tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(served.token_bytes(t) for t in ids) == text.encode("utf-8")
    assert any(served.tokenizer.decode([t]).encode() != served.token_bytes(t) for t in ids)  # split characters


def test_streams_of_several_choices_interleave_by_index(client):
    kwargs = {"model": "chat", "messages": MESSAGES, "n": 3, "seed": 3, "max_tokens": 8}
    whole = client.chat.completions.create(**kwargs)
    texts = ["", "", ""]
    finished = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.append(choice.index)
    assert texts == [c.message.content for c in whole.choices] and sorted(finished) == [0, 1, 2]
    prompts = ["the quick brown", "hello"]
    plain = client.completions.create(model="chat", prompt=prompts, n=2, seed=5, max_tokens=6)
    streamed = ["" for _ in range(4)]
    for chunk in client.completions.create(model="chat", prompt=prompts, n=2, seed=5, max_tokens=6, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in plain.choices]
