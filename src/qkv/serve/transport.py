"""HTTP plumbing under the endpoints: the gate every request passes (API key, body size, the
response counter of /metrics) and server-sent events that stop their work when the client goes."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from qkv.serve.errors import APIError, error_body
from qkv.serve.metrics import Metrics

# Paths counted by name in /metrics; any other is counted as "other" (no unbounded label values).
ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/health", "/metrics")


class Gate:
    """ASGI middleware: 401 without the API key on /v1/*, 413 for a body over the cap (by its
    Content-Length, or counted as it arrives when chunked), with OpenAI-shaped errors."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(endpoint, message["status"])
            await send(message)

        await self._gate(scope, receive, counting)

    async def _gate(self, scope: dict, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        key = self.api_key
        if key is not None and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not given.startswith("Bearer "):
                return await _reply(send, APIError(401, "missing API key: send 'Authorization: Bearer KEY'",
                                                   code="invalid_api_key"))  # fmt: skip
            if not hmac.compare_digest(given[len("Bearer ") :].encode(), key.encode()):
                return await _reply(send, APIError(401, "incorrect API key provided", code="invalid_api_key"))
        cap = self.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return await _reply(send, too_large(cap))
        seen, refused = 0, False

        async def counted() -> dict:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap and not refused:
                    refused = True  # answer now; to the app the client has gone
                    await _reply(send, too_large(cap))
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict) -> None:
            if not refused:  # after a 413 the app's own answer (to a "disconnect") goes nowhere
                await send(message)

        await self.app(scope, counted, guarded)


def too_large(cap: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {cap} bytes", code="body_too_large")


async def _reply(send: Any, error: APIError) -> None:
    body = json.dumps(error_body(error.status, error.message, error.param, error.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends (a client gone
    mid-stream included), so the work behind it is aborted at once."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def chunk_writer(kind: str, ident: str, created: int, model: str, include_usage: bool) -> Callable[..., str]:
    """`chunk(choices, usage=None)` -> one SSE event of a streamed completion of object type `kind`
    ("chat.completion.chunk" or "text_completion"), as OpenAI sends them: every chunk carries the
    id, creation time and model; with `stream_options.include_usage` each also has a `usage` field,
    null until the last."""

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
        payload = {"id": ident, "object": kind, "created": created, "model": model, "system_fingerprint": None,
                   "choices": choices}  # fmt: skip
        if include_usage:
            payload["usage"] = usage.model_dump() if usage is not None else None
        return sse(payload)

    return chunk
