"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with its status.

A client's mistake is a 4xx naming what was wrong (the parameter in ``param``); only the server's
own failures are 5xx. FastAPI's 422 for a body that does not fit the schema becomes a 400, as
OpenAI answers it, and malformed JSON is a 400 too.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qkv.errors import QkvError

log = logging.getLogger("qkv.serve")

# OpenAI's error types by status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An answer other than 2xx: status, message, and OpenAI's param/code fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.status, self.message, self.param, self.code), self.status, headers=self.headers
        )


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def queue_full(retry_after: float) -> APIError:
    seconds = max(1, math.ceil(retry_after))
    return APIError(
        429,
        f"the server is at capacity (its request queue is full); retry in about {seconds} s",
        code="queue_full",
        headers={"Retry-After": str(seconds)},
    )


def param_path(loc: tuple[Any, ...]) -> str | None:
    """A pydantic location ('body', 'messages', 0, 'role') as OpenAI writes it: messages[0].role."""
    parts = [p for p in loc if p != "body"]
    # Pydantic adds the tried union member's name to the location (str, list[str], ...): drop them.
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "function-after")))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail}); send a JSON object", None
    param = param_path(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return f"missing required parameter: {param!r}", param
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param!r}; remove it", param
    if first.get("type") == "model_attributes_type" and param is None:
        return "the request body must be a JSON object", None
    message = first.get("msg", "invalid request")
    value = first.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else "the value given"
    return f"invalid value for {param!r}: {message} (got {shown})", param


def install(app: FastAPI) -> None:
    """Route every error the app can raise to an OpenAI-shaped JSON answer."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param), 400)

    @app.exception_handler(QkvError)
    async def _qkv_error(request: Request, exc: QkvError) -> JSONResponse:
        return JSONResponse(error_body(400, str(exc)), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_body(exc.status_code, message), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}: {exc}"), 500)
