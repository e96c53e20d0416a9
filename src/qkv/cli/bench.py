"""`qkv bench MODEL`: how fast MODEL runs on this machine, optionally against llama.cpp.

MODEL is anything `qkv.load` takes. Each number comes from a fresh process (see `qkv.bench` for
what exactly is timed): batch-1 decode, prefill of 512 tokens, batch-16 throughput, load time,
peak RSS, and the time from a new process to its first decoded token, twice (the first start may
compile; the second reuses the on-disk compile cache).

  --against llama.cpp   run the same GGUF file in llama.cpp (llama-cpp-python) with the same prompt
                        ids and threads, and print qkv/llama.cpp ratios. The peer interpreter is
                        --peer-python, by default this one; it needs llama_cpp:
                        CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python

  qkv bench smollm2-135m-instruct
  qkv bench smollm2-135m-instruct --against llama.cpp --peer-python ~/peer-venv/bin/python
"""

from __future__ import annotations

import argparse
import json

from qkv.cli.args import add_model_argument, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure decode/prefill speed, load time and memory, optionally vs llama.cpp",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_model_argument(p)
    p.add_argument("--against", choices=("llama.cpp",), default=None, help="a peer to measure on the same GGUF file")
    p.add_argument("--peer-python", metavar="PATH", default=None,
                   help="the interpreter that has llama_cpp (default: this one)")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=3, help="best of N runs per number (default 3)")
    p.add_argument("--threads", type=positive_int, default=None, help="threads, both sides (default: physical cores)")
    p.add_argument("--new-tokens", type=positive_int, default=128,
                   help="batch-1 decode length (default 128); each batch row decodes half as many")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    p.add_argument("--no-extra-bufts", action="store_true",
                   help="turn llama.cpp's extra buffer types off (they crash on some AMX Xeons)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkv.bench import BenchConfig, run_bench
    from qkv.errors import UsageError

    for flag, given in (("--peer-python", args.peer_python is not None), ("--no-extra-bufts", args.no_extra_bufts)):
        if given and args.against is None:
            raise UsageError(f"{flag} applies to --against llama.cpp; add --against llama.cpp or drop {flag}")
    config = BenchConfig(
        new_tokens=args.new_tokens, batch_new_tokens=max(1, args.new_tokens // 2), repeats=args.repeats,
        threads=args.threads, extra_bufts=not args.no_extra_bufts,
    )  # fmt: skip
    result = run_bench(args.model, config, against=args.against, peer_python=args.peer_python)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0
