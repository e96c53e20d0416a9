"""The OpenAI-compatible HTTP API: `create_app(models, options)` -> a FastAPI app.

Endpoints: GET /v1/models, /health, /metrics; POST /v1/chat/completions, /v1/completions,
/v1/embeddings. Decoders generate in their continuous-batching engine (`qkv.serve.engine`);
seq2seq models and beam search run `qkv.generation.text.complete` on the model's worker thread;
encoders embed there too. Errors have OpenAI's shape (`qkv.serve.errors`).
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from qkv.errors import QkvError, UsageError
from qkv.generation.constrained import response_format_schema
from qkv.generation.options import GenerationConfig
from qkv.serve import schemas as s
from qkv.serve.errors import APIError, bad_request, error_body, install, queue_full
from qkv.serve.metrics import Metrics
from qkv.serve.models import ServedModel, embed_ids, embed_texts
from qkv.serve.runs import Choice, Piece, collect, finish_reason, stream_engine, stream_worker, submit_all
from qkv.serve.transport import EventStream, Gate, chunk_writer, sse

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 128  # prompts x n in one /v1/completions request


@dataclass(frozen=True)
class ServeOptions:
    """Server-wide settings (the engine's are per model: `qkv.serve.engine.EngineOptions`)."""

    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer KEY"
    max_tokens_cap: int = 4096  # the most tokens one choice may generate
    max_body_bytes: int = 8 * 2**20  # larger request bodies are refused with 413 before being read
    shutdown_grace_seconds: float = 5.0  # Ctrl-C lets in-flight requests finish this long, then aborts


ERRORS = {status: {"model": s.ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
# One server-sent event, as OpenAPI before 3.2 reads a text/event-stream schema: each `data:` line
# a JSON chunk (or "[DONE]") of the endpoint's chunk shape.
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
             "required": ["data"]}  # fmt: skip
STREAMABLE = {**ERRORS, 200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def create_app(models: dict[str, ServedModel], options: ServeOptions | None = None) -> FastAPI:
    """The API over `models` (served name -> model); their engines start and stop with the app."""
    options = options or ServeOptions()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for served in models.values():
            served.start()
        try:
            yield
        finally:
            for served in models.values():
                served.stop(abort=True)

    app = FastAPI(title="qkv", version="1", lifespan=lifespan, summary="OpenAI-compatible API over qkv models")
    app.add_middleware(Gate, api_key=options.api_key, max_body_bytes=options.max_body_bytes, metrics=metrics)
    install(app)
    app.state.models = models
    app.state.metrics = metrics

    def pick(name: str, endpoint: str) -> ServedModel:
        served = models.get(name)
        if served is None:
            raise APIError(404, f"the model {name!r} does not exist; this server has: {', '.join(models)}",
                           "model", "model_not_found")  # fmt: skip
        kinds = {"chat": ("decoder",), "completions": ("decoder", "seq2seq"), "embeddings": ("encoder",)}[endpoint]
        if served.kind not in kinds:
            use = {"decoder": "/v1/chat/completions or /v1/completions", "seq2seq": "/v1/completions",
                   "encoder": "/v1/embeddings"}[served.kind]  # fmt: skip
            raise bad_request(f"model {name!r} is {'an' if served.kind == 'encoder' else 'a'} {served.kind} model; "
                              f"use it with {use}", "model", "model_not_supported")  # fmt: skip
        if endpoint == "chat" and not served.has_chat_template:
            raise bad_request(f"model {name!r} has no chat template; use /v1/completions with plain text", "model")
        return served

    def budget(served: ServedModel, prompt_len: int, asked: int | None, default: int | None, where: str) -> int:
        """Tokens to generate: `asked` checked against the cap and the context, else the default."""
        cap = options.max_tokens_cap
        if asked is not None and asked > cap:
            raise bad_request(f"max_tokens={asked} is above this server's cap of {cap} (qkv serve --max-tokens-cap)",
                              "max_tokens")  # fmt: skip
        context = served.context if served.kind == "decoder" else None
        if context is None:
            return asked or min(default or cap, cap)
        room = context - prompt_len
        if asked is None:
            if room < 1:
                raise bad_request(f"this model's context is {context} tokens, and the {where} alone is {prompt_len} "
                                  f"tokens; shorten the {where}", where, "context_length_exceeded")  # fmt: skip
            return min(default or cap, cap, room)
        if asked > room:
            raise bad_request(
                f"this model's context is {context} tokens, but you asked for {prompt_len + asked} tokens "
                f"({prompt_len} in the {where} + max_tokens={asked}); shorten the {where} or lower max_tokens",
                "max_tokens", "context_length_exceeded",
            )  # fmt: skip
        return asked

    def sampling(body: Any, max_new: int, **extra: Any) -> GenerationConfig:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = None if body.top_p in (None, 1.0) else body.top_p
        return GenerationConfig(
            max_new_tokens=max_new, temperature=temperature, top_p=top_p, frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty, seed=body.seed, stop=tuple(stop), **extra,
        )  # fmt: skip

    def per_choice(config: GenerationConfig, n: int) -> list[GenerationConfig]:
        """n choices: with a seed, choice i samples with seed + i (else they would all be the same)."""
        if config.seed is None or n == 1:
            return [config] * n
        return [replace(config, seed=config.seed + i) for i in range(n)]

    def token_text(served: ServedModel, token: int) -> str:
        return served.tokenizer.decode([token], skip_special_tokens=False)

    def check_ids(served: ServedModel, ids: list[int], param: str) -> list[int]:
        vocab = served.model.config.vocab_size
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} in {param} is outside the vocabulary of {vocab}", param)
        return ids

    def usage(choices: list[Choice], per_prompt: int) -> s.Usage:
        firsts = [c.done for c in choices[::per_prompt] if c.done is not None]
        prompt = sum(d.prompt_tokens for d in firsts)
        completion = sum(c.done.completion_tokens for c in choices if c.done is not None)
        cached = sum(d.cached_tokens for d in firsts)
        return s.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=s.PromptTokensDetails(cached_tokens=cached))  # fmt: skip

    def chat_logprobs(served: ServedModel, records: list) -> s.ChoiceLogprobs:
        def entry(token: int, lp: float) -> dict[str, Any]:
            return {"token": token_text(served, token), "bytes": list(served.token_bytes(token)), "logprob": lp}

        return s.ChoiceLogprobs(content=[
            s.TokenLogprob(**entry(t, lp), top_logprobs=[s.TopLogprob(**entry(i, v)) for i, v in top or []])
            for t, lp, top in records
        ])  # fmt: skip

    def completion_logprobs(served: ServedModel, records: list, offset: int, top: int) -> s.CompletionLogprobs:
        tokens = [token_text(served, t) for t, _, _ in records]
        offsets, at = [], offset
        for text in tokens:
            offsets.append(at)
            at += len(text)
        tops = [{token_text(served, i): v for i, v in t or []} for _, _, t in records] if top else None
        return s.CompletionLogprobs(tokens=tokens, token_logprobs=[lp for _, lp, _ in records], top_logprobs=tops,
                                    text_offset=offsets)  # fmt: skip

    def track(name: str) -> float:
        metrics.request_started(name)
        return time.perf_counter()

    def untrack(name: str, started: float) -> None:
        metrics.request_finished(name, time.perf_counter() - started)

    # -- service endpoints ------------------------------------------------------------------------
    @app.get("/v1/models", response_model=s.ModelList, responses=ERRORS)
    async def list_models() -> s.ModelList:
        return s.ModelList(data=[s.ModelCard(id=name, created=m.created) for name, m in models.items()])

    @app.get("/v1/models/{model}", response_model=s.ModelCard, responses=ERRORS)
    async def get_model(model: str) -> s.ModelCard:
        if model not in models:
            raise APIError(404, f"the model {model!r} does not exist; this server has: {', '.join(models)}",
                           "model", "model_not_found")  # fmt: skip
        return s.ModelCard(id=model, created=models[model].created)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {name: m.kind for name, m in models.items()}}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        gauges = {}
        for name, served in models.items():
            if served.engine is not None:
                stats = served.engine.stats()
                gauges[name] = {"queue_depth": stats.queue_depth, "active_slots": stats.active_slots,
                                "max_batch": stats.max_batch}  # fmt: skip
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    # -- chat -------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=s.ChatCompletion, responses=STREAMABLE)
    async def chat_completions(body: s.ChatCompletionRequest) -> Any:
        served = pick(body.model, "chat")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content, **({"name": m.name} if m.name else {})})
        try:
            prompt = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except QkvError as exc:
            raise bad_request(f"the chat template cannot render these messages: {exc}", "messages") from None
        except Exception as exc:  # a template's own raise_exception (e.g. roles must alternate)
            raise bad_request(f"the chat template refused these messages: {exc}", "messages") from None
        if body.max_tokens is not None and body.max_completion_tokens not in (None, body.max_tokens):
            raise bad_request("max_tokens and max_completion_tokens differ; send one of them", "max_tokens")
        asked = body.max_completion_tokens or body.max_tokens
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        try:
            schema = response_format_schema(body.response_format.model_dump(by_alias=True)
                                            if body.response_format else None)  # fmt: skip
        except QkvError as exc:
            raise bad_request(str(exc), "response_format") from None
        max_new = budget(served, len(prompt), asked, None, "messages")
        try:
            config = sampling(body, max_new, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
                              json_schema=schema)  # fmt: skip
        except QkvError as exc:
            raise bad_request(str(exc), "response_format" if schema is not None else None) from None
        started = track(served.name)
        try:
            handles = submit_all(served, prompt, per_choice(config, body.n))
        except APIError:
            untrack(served.name, started)
            raise
        events = stream_engine(served, handles, metrics, started)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(ended(served, events, started, chat_stream(served, body, events, ident, created,
                                                                          include_usage)))  # fmt: skip
        try:
            choices = await collect(events, body.n)
        finally:
            untrack(served.name, started)
        return s.ChatCompletion(
            id=ident, created=created, model=served.name, usage=usage(choices, body.n),
            choices=[
                s.ChatChoice(index=i, message=s.AssistantMessage(content=c.text),
                             finish_reason=finish_reason(c.done.reason),
                             logprobs=chat_logprobs(served, c.logprobs) if body.logprobs else None)
                for i, c in enumerate(choices)
            ],
        )  # fmt: skip

    async def ended(
        served: ServedModel, events: AsyncIterator, started: float, chunks: AsyncIterator[str]
    ) -> AsyncIterator[str]:
        """A stream's chunks, then `data: [DONE]`; an APIError on the way ends it with an error
        event instead. Whatever happens (a client leaving mid-stream included), the request's
        events are closed, which aborts what is still running, and its tracking ends."""
        try:
            async for piece in chunks:
                yield piece
            yield "data: [DONE]\n\n"
        except APIError as exc:
            yield sse(error_body(exc.status, exc.message, exc.param, exc.code))
        finally:
            await chunks.aclose()
            await events.aclose()
            untrack(served.name, started)

    async def chat_stream(
        served: ServedModel, body: s.ChatCompletionRequest, events: AsyncIterator, ident: str, created: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        chunk = chunk_writer("chat.completion.chunk", ident, created, served.name, include_usage)

        def choice(i: int, delta: dict[str, Any], reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

        choices = [Choice() for _ in range(body.n)]
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(body.n)])
        async for i, event in events:
            choices[i].add(event)
            if isinstance(event, Piece):
                if event.text or (body.logprobs and event.logprobs):
                    lps = chat_logprobs(served, event.logprobs).model_dump() if body.logprobs else None
                    yield chunk([choice(i, {"content": event.text}, logprobs=lps)])
            else:
                if event.text:
                    yield chunk([choice(i, {"content": event.text})])
                yield chunk([choice(i, {}, finish_reason(event.reason))])
        if include_usage:
            yield chunk([], usage(choices, body.n))

    # -- completions ------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=s.Completion, responses=STREAMABLE)
    async def completions(body: s.CompletionRequest) -> Any:
        from qkv.generation.text import complete, encode_prompt, stream_completion

        served = pick(body.model, "completions")
        raw = body.prompt
        if isinstance(raw, str):
            prompts: list[Any] = [raw]
        elif raw and isinstance(raw[0], int):
            prompts = [raw]
        else:
            prompts = list(raw)
        if len(prompts) * body.n > MAX_CHOICES:
            raise bad_request(f"{len(prompts)} prompts x n={body.n} is more than {MAX_CHOICES} choices", "prompt")
        beams = body.qkv.num_beams if body.qkv else 1
        if body.best_of is not None and body.best_of > 1:
            if beams > 1 and beams != body.best_of:
                raise bad_request(f"best_of={body.best_of} and qkv.num_beams={beams} differ; send one", "best_of")
            beams = body.best_of
        if beams > 1 and body.n > 1:
            raise bad_request("beam search returns its best sequence: n must be 1 with best_of/qkv.num_beams", "n")
        if beams > 1 and body.stream:
            raise bad_request("beam search finds its text only at the end and cannot stream; set stream=false",
                              "stream")  # fmt: skip
        if body.echo and body.logprobs is not None:
            raise bad_request("echo with logprobs (the prompt's log-probs) is not supported; drop one", "echo")
        worker = served.kind == "seq2seq" or beams > 1
        if worker and body.stream and body.logprobs is not None:
            raise bad_request("logprobs cannot stream from a seq2seq model; set stream=false", "logprobs")
        ids_list = []
        for k, p in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
            if isinstance(p, str):
                try:
                    ids = encode_prompt(served.tokenizer, p, add_special_tokens=True)
                except UsageError as exc:
                    raise bad_request(str(exc), where) from None
            else:
                ids = check_ids(served, list(p), where)
            ids_list.append(ids)
        extra: dict[str, Any] = {}
        if body.logprobs is not None:
            extra = {"logprobs": True, "top_logprobs": body.logprobs}
        if body.qkv is not None:
            extra |= body.qkv.model_dump(exclude={"num_beams"}, exclude_defaults=True)
        if beams > 1:
            extra["num_beams"] = beams
        configs = []
        for ids in ids_list:
            max_new = budget(served, len(ids), body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
            config = sampling(body, max_new, **extra)
            if beams > 1 and body.temperature is None:
                config = replace(config, temperature=0.0)  # deterministic beams unless asked to sample
            configs.append(config)
        if worker and served.busy:
            raise queue_full(1.0)
        started = track(served.name)
        n = body.n
        try:
            if worker:

                def makes(ids: list[int], config: GenerationConfig) -> list[Any]:
                    def one(c: GenerationConfig) -> Any:
                        if body.stream:
                            return lambda: stream_completion(served.model, served.tokenizer, ids, c)
                        return lambda: iter([complete(served.model, served.tokenizer, ids, c)])

                    return [one(c) for c in per_choice(config, n)]

                jobs = [job for ids, config in zip(ids_list, configs) for job in makes(ids, config)]
                events = stream_worker(served, jobs, metrics, started)
            else:
                handles: list[Any] = []
                try:
                    for ids, config in zip(ids_list, configs):
                        handles += submit_all(served, ids, per_choice(config, n))
                except APIError:
                    for handle in handles:
                        handle.abort()
                    raise
                events = stream_engine(served, handles, metrics, started)
        except APIError:
            untrack(served.name, started)
            raise
        echoes = [served.tokenizer.decode(ids) if body.echo else "" for ids in ids_list]
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        total = len(prompts) * n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = completion_stream(served, body, events, ident, created, include_usage, echoes, total)
            return EventStream(ended(served, events, started, chunks))
        try:
            choices = await collect(events, total)
        finally:
            untrack(served.name, started)
        return s.Completion(
            id=ident, created=created, model=served.name, usage=usage(choices, n),
            choices=[
                s.CompletionChoice(
                    index=i, text=echoes[i // n] + c.text, finish_reason=finish_reason(c.done.reason),
                    logprobs=(completion_logprobs(served, c.logprobs, len(echoes[i // n]), body.logprobs)
                              if body.logprobs is not None else None),
                )
                for i, c in enumerate(choices)
            ],
        )  # fmt: skip

    async def completion_stream(
        served: ServedModel, body: s.CompletionRequest, events: AsyncIterator, ident: str, created: int,
        include_usage: bool, echoes: list[str], total: int,
    ) -> AsyncIterator[str]:  # fmt: skip
        chunk = chunk_writer("text_completion", ident, created, served.name, include_usage)

        def choice(i: int, text: str, reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}

        choices = [Choice() for _ in range(total)]
        offsets = [len(echoes[i // body.n]) for i in range(total)]
        for i in range(total):
            if echoes[i // body.n]:
                yield chunk([choice(i, echoes[i // body.n])])
        async for i, event in events:
            choices[i].add(event)
            if isinstance(event, Piece):
                if event.text or (body.logprobs is not None and event.logprobs):
                    lps = None
                    if body.logprobs is not None:
                        lps = completion_logprobs(served, event.logprobs, offsets[i], body.logprobs).model_dump()
                    offsets[i] += len(event.text)
                    yield chunk([choice(i, event.text, logprobs=lps)])
            else:
                if event.text:
                    yield chunk([choice(i, event.text)])
                yield chunk([choice(i, "", finish_reason(event.reason))])
        if include_usage:
            yield chunk([], usage(choices, body.n))

    # -- embeddings -------------------------------------------------------------------------------
    @app.post("/v1/embeddings", response_model=s.EmbeddingList, responses=ERRORS)
    async def embeddings(body: s.EmbeddingRequest) -> s.EmbeddingList:
        served = pick(body.model, "embeddings")
        if served.busy:
            raise queue_full(1.0)
        raw = body.input
        started = track(served.name)
        try:
            if isinstance(raw, str) or (raw and isinstance(raw[0], str)):
                texts = [raw] if isinstance(raw, str) else list(raw)
                vectors, n_tokens = await served.run(embed_texts, served.model, served.tokenizer, texts)
            else:
                rows = [raw] if isinstance(raw[0], int) else [list(r) for r in raw]
                vectors = await served.run(embed_ids, served.model, served.tokenizer, rows)
                n_tokens = sum(len(r) for r in rows)
        except UsageError as exc:
            raise bad_request(str(exc), "input") from None
        finally:
            untrack(served.name, started)
        data = []
        for i, row in enumerate(vectors):
            if body.encoding_format == "base64":
                value: Any = base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii")
            else:
                value = np.asarray(row.numpy(), dtype=np.float64).tolist()
            data.append(s.Embedding(index=i, embedding=value))
        return s.EmbeddingList(data=data, model=served.name,
                               usage=s.EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens))  # fmt: skip

    return app
