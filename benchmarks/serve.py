"""Serving load: `qkv serve` on SmolLM2's Q4_1 GGUF under concurrent streaming chat clients, and
(with --against llama.cpp) llama-cpp-python's OpenAI server on the same file, side by side.

Each server runs in its own process on loopback. `--streams` clients (default 16) each send
streaming greedy chat requests one after another until `--requests` have been answered; the run
prints p50/p99 time to first token, p50/p99 inter-token latency (the gaps between content chunks
of one stream) and aggregate generated tokens/s over the whole run (completion tokens from each
stream's usage, or its content chunks where a server reports no usage), then qkv / llama.cpp.

    python benchmarks/serve.py                         # qkv alone
    python benchmarks/serve.py --against llama.cpp     # both, and the ratio

Numbers taken while other processes load the machine are noisy: compare sides of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PEER = "/work/peer-venv/bin/python"
TOPICS = ["the sea", "bread", "winter", "trains", "music", "cats", "rivers", "clocks", "maps", "bees", "glass", "salt"]


@dataclass
class Stream:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_stream(client, model: str, topic: str, max_tokens: int) -> Stream:
    body = {
        "model": model, "temperature": 0, "max_tokens": max_tokens, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Write a long paragraph about {topic}."}],
    }  # fmt: skip
    out, start, last, chunks = Stream(), time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[len("data: ") :])
            if payload.get("usage"):
                out.tokens = payload["usage"]["completion_tokens"]
            for choice in payload.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        out.ttft = now - start
                    else:
                        out.gaps.append(now - last)
                    last, chunks = now, chunks + 1
    out.tokens = out.tokens or chunks
    return out


async def load(url: str, model: str, streams: int, requests: int, max_tokens: int) -> dict[str, float]:
    import httpx

    results: list[Stream] = []
    counter = iter(range(requests))

    async def client_loop(client) -> None:
        for i in counter:
            results.append(await one_stream(client, model, TOPICS[i % len(TOPICS)], max_tokens))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as c:
        await one_stream(c, model, "warming up", 8)  # compile / first-call costs out of the numbers
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for _ in range(streams)))
        wall = time.perf_counter() - start
    gaps = [g for r in results for g in r.gaps]
    return {
        "ttft_p50": percentile([r.ttft for r in results], 50),
        "ttft_p99": percentile([r.ttft for r in results], 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
        "tokens_per_second": sum(r.tokens for r in results) / wall,
        "tokens": sum(r.tokens for r in results),
        "wall": wall,
        "mean_tokens": statistics.mean(r.tokens for r in results),
    }


def start(cmd: list[str], url_from: str | None, port: int | None, log: Path) -> tuple:
    """Start a server process, its output to `log` -> (process, base URL): the URL qkv prints on
    stdout, or http://127.0.0.1:PORT."""
    out = log.open("w")
    stdout = subprocess.PIPE if url_from is not None else out
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=out, text=True)
    proc.log = log
    if url_from is not None:
        for line in proc.stdout:
            match = re.search(url_from, line)
            if match:
                return proc, match.group(1)
        raise RuntimeError(f"{cmd[0]} exited before printing its URL: {log.read_text()[-2000:]}")
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, url: str, timeout: float = 300) -> str:
    """Wait until GET /v1/models answers; -> the first model id."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_side(name: str, cmd: list[str], url_from: str | None, port: int | None, args) -> dict[str, float]:
    proc, url = start(cmd, url_from, port, Path(tempfile.gettempdir()) / f"serve-bench-{name}.log")
    try:
        model = wait_ready(proc, url.removesuffix("/v1"))
        print(f"{name}: ready at {url}", flush=True)
        return asyncio.run(load(url.removesuffix("/v1"), model, args.streams, args.requests, args.max_tokens))
    finally:
        stop(proc)


def main() -> int:
    from qkv.bench import check_peer_python, gguf_file
    from qkv.hub import pull

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=16, help="concurrent streaming clients (default 16)")
    p.add_argument("--requests", type=int, default=48, help="requests in all (default 48: 3 per stream)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    p.add_argument("--against", choices=["llama.cpp"], default=None, help="also run llama-cpp-python's server")
    p.add_argument("--peer-python", default=DEFAULT_PEER, help=f"interpreter with llama_cpp (default {DEFAULT_PEER})")
    p.add_argument("--peer-port", type=int, default=8765)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    args = p.parse_args()
    if args.against:
        check_peer_python(args.peer_python)
        probe = [args.peer_python, "-c", "import uvicorn, fastapi, sse_starlette, starlette_context, pydantic_settings"]
        if subprocess.run(probe, capture_output=True).returncode != 0:
            sys.exit(f"{args.peer_python} lacks llama-cpp-python's server packages: "
                     f"{args.peer_python} -m pip install 'llama-cpp-python[server]' (or uvicorn fastapi sse-starlette "
                     "starlette-context pydantic-settings)")  # fmt: skip
    path: Path = gguf_file(pull("smollm2-135m-instruct"))
    print(f"SmolLM2-135M-Instruct {path.name}: {args.streams} streams, {args.requests} requests of "
          f"{args.max_tokens} tokens, greedy; load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    sides = {}
    qkv_cmd = [sys.executable, "-m", "qkv.cli.main", "serve", str(path), "--port", "0",
               "--max-batch", str(args.streams), "--max-queue", str(max(64, args.requests))]  # fmt: skip
    sides["qkv"] = run_side("qkv", qkv_cmd, r"listening on (http://\S+)", None, args)
    if args.against:
        peer_cmd = [args.peer_python, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                    "--port", str(args.peer_port), "--n_ctx", "4096", "--n_threads", str(args.threads),
                    "--n_threads_batch", str(args.threads), "--interrupt_requests", "False"]  # fmt: skip
        sides["llama.cpp"] = run_side("llama.cpp", peer_cmd, None, args.peer_port, args)
    rows = [("TTFT p50 (s)", "ttft_p50"), ("TTFT p99 (s)", "ttft_p99"), ("inter-token p50 (ms)", "itl_p50"),
            ("inter-token p99 (ms)", "itl_p99"), ("aggregate tokens/s", "tokens_per_second")]  # fmt: skip
    names = list(sides)
    print("\n| metric | " + " | ".join(names) + (" | qkv / llama.cpp |" if len(names) > 1 else " |"))
    print("|---" * (len(names) + 1 + (len(names) > 1)) + "|")
    for label, key in rows:
        scale = 1000 if key.startswith("itl") else 1
        cells = [f"{sides[n][key] * scale:.3f}" if scale == 1 and key != "tokens_per_second" else
                 f"{sides[n][key] * scale:.1f}" for n in names]  # fmt: skip
        ratio = f" | {sides['qkv'][key] / sides['llama.cpp'][key]:.2f}x" if len(names) > 1 else ""
        print(f"| {label} | " + " | ".join(cells) + ratio + " |")
    for n in names:
        print(f"{n}: {sides[n]['tokens']} tokens in {sides[n]['wall']:.1f} s "
              f"(mean {sides[n]['mean_tokens']:.1f} per request)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
