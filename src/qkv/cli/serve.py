"""`qkv serve MODEL [MODEL...]`: an OpenAI-compatible HTTP server over qkv models.

Each MODEL is anything `qkv.load` takes (a checkpoint directory, a Hugging Face directory, a .gguf
file or a known name), served under its path's stem or under NAME when written NAME=PATH. Decoders
answer /v1/chat/completions and /v1/completions (continuous batching), seq2seq models
/v1/completions, encoders /v1/embeddings. Ctrl-C stops the server: in-flight requests get a few
seconds to finish, then are aborted.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys

from qkv.cli.args import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server", description=__doc__)
    p.add_argument("models", nargs="+", metavar="MODEL", help="NAME=PATH or PATH (served as the path's stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-batch", type=positive_int, default=8, help="decode slots per decoder (default: 8)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="waiting requests per decoder before answering 429 (default: 64)")  # fmt: skip
    p.add_argument("--max-tokens-cap", type=positive_int, default=4096,
                   help="the most tokens one choice may generate (default: 4096)")  # fmt: skip
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="a decoder's slot length: prompt + completion (default: its context, <= 4096)")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (default: auto, on for packed quantized decoders)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkv.errors import UsageError

    try:
        import uvicorn
    except ImportError:
        raise UsageError("qkv serve needs FastAPI and uvicorn: pip install 'qkv[serve]'") from None

    from qkv.serve.app import ServeOptions, create_app
    from qkv.serve.engine import EngineOptions
    from qkv.serve.models import load_served, parse_model_spec

    names = [parse_model_spec(spec)[0] for spec in args.models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"two models would be served as {duplicates[0]!r}; name them apart with NAME=PATH")
    engine_options = EngineOptions(
        max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context, compile=args.compile
    )
    from qkv.threads import in_own_thread

    models = {}
    for spec in args.models:
        # on a thread of its own: the main thread then holds no OpenMP team to slow the engine's
        # thread down (benchmarks/omp_threads.py)
        served = in_own_thread(load_served, spec, engine_options, dtype=args.dtype)
        models[served.name] = served
        print(f"qkv serve: {served.name} ({served.kind})", file=sys.stderr)
    options = ServeOptions(api_key=args.api_key, max_tokens_cap=args.max_tokens_cap)
    app = create_app(models, options)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))  # bound here, so the URL printed is the one that answers (port 0 too)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"qkv serve: listening on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    grace = options.shutdown_grace_seconds
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled, after shutting down
        uvicorn.Server(config).run(sockets=[sock])
    print("qkv serve: stopped", file=sys.stderr)
    return 0
