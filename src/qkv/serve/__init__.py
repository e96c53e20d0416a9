"""Serving: a continuous-batching engine (`qkv.serve.engine`) under the OpenAI-compatible server.

Only light imports here: the HTTP layer (FastAPI) lives in its own modules and is imported by
whoever serves over HTTP, never by the engine.
"""

from qkv.serve.engine import (
    Engine,
    EngineOptions,
    EngineStats,
    FinishEvent,
    Handle,
    QueueFull,
    Request,
    TokenEvent,
)

__all__ = ["Engine", "EngineOptions", "EngineStats", "FinishEvent", "Handle", "QueueFull", "Request", "TokenEvent"]
