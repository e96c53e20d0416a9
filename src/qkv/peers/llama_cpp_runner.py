"""llama.cpp (through llama-cpp-python) measured the way `qkv.bench` measures qkv: a standalone script.

It imports only the standard library and llama_cpp (plus numpy, which llama_cpp brings), never
torch or qkv, so it runs under another interpreter, the one where llama-cpp-python is installed:

    PEER_PYTHON src/qkv/peers/llama_cpp_runner.py speed --model M.gguf --threads 2 --ids-file ids.json
    PEER_PYTHON src/qkv/peers/llama_cpp_runner.py ppl --model M.gguf --threads 2 --ids-file ids.json

speed: the ids file holds {"prompt": [ids], "prefill": [ids], "new_tokens": 128, "repeats": 3}.
  Prints one JSON line: load_s (constructing `Llama`), decode_tok_s (batch 1, greedy, EOS ignored:
  new_tokens - 1 tokens over the time from the first generated token to the last, best of repeats),
  prefill_tok_s (evaluating the prefill ids from an empty context, best of repeats), maxrss_mb
  (the process's peak RSS), threads, extra_bufts (whether llama.cpp's extra buffer types, its
  repacked weight layouts, were on) and the llama_cpp version.
ppl: the ids file holds {"ids": [ids], "window": 512}. Each consecutive non-overlapping window
  (a last partial one of >= 2 tokens too) is evaluated from an empty context; the negative
  log-likelihood (natural log) of tokens 1..n-1 of each window given the ones before is summed.
  Prints {"nll_sum", "count", "ppl": exp(nll_sum / count)} - the protocol of
  `qkv.evaluation.perplexity`, so the two compare.

Threads: llama-cpp-python defaults to half the logical CPUs; pass --threads (used for both
n_threads and n_threads_batch), normally the machine's physical core count. --no-extra-bufts turns
the extra buffer types off (on some Xeons with AMX they crash on batches of more than one token).
Errors (llama_cpp missing, a bad file or argument) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time


class RunnerError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("speed", "ppl"))
    p.add_argument("--model", required=True, help="the .gguf file")
    p.add_argument("--threads", type=int, required=True, help="n_threads and n_threads_batch (physical cores)")
    p.add_argument("--ids-file", required=True, help="JSON with the token ids (see the modes above)")
    p.add_argument("--no-extra-bufts", action="store_true", help="turn llama.cpp's extra buffer types off")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def read_ids_file(path: str, mode: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as exc:
        raise RunnerError(f"cannot read --ids-file {path}: {exc}") from None
    need = {"speed": ("prompt", "prefill", "new_tokens", "repeats"), "ppl": ("ids", "window")}[mode]
    missing = [k for k in need if k not in spec] if isinstance(spec, dict) else list(need)
    if missing:
        raise RunnerError(f"--ids-file {path} lacks {', '.join(missing)} (the {mode} mode needs {', '.join(need)})")
    return spec


def open_model(path: str, threads: int, extra_bufts: bool, n_ctx: int, logits_all: bool):
    """(llama_cpp module, Llama, seconds the construction took)."""
    try:
        import llama_cpp
        import llama_cpp.llama
    except ImportError as exc:
        raise RunnerError(
            f"llama_cpp cannot be imported by {sys.executable} ({exc}); install it with "
            'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python'
        ) from None
    defaults = llama_cpp.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = extra_bufts
        return params

    # Llama.__init__ reads the defaults through llama_cpp.llama.llama_cpp; patch both names.
    llama_cpp.llama_model_default_params = model_params
    llama_cpp.llama.llama_cpp.llama_model_default_params = model_params
    start = time.perf_counter()
    try:
        llm = llama_cpp.Llama(
            model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
            n_threads_batch=threads, logits_all=logits_all, verbose=False,
        )  # fmt: skip
    except (ValueError, RuntimeError, OSError) as exc:
        raise RunnerError(f"llama.cpp cannot load --model {path}: {exc}") from None
    return llama_cpp, llm, time.perf_counter() - start


def speed(args: argparse.Namespace, spec: dict) -> dict:
    prompt, prefill, n, repeats = spec["prompt"], spec["prefill"], int(spec["new_tokens"]), int(spec["repeats"])
    if n < 2 or repeats < 1 or not prompt or not prefill:
        raise RunnerError("speed needs new_tokens >= 2, repeats >= 1 and non-empty prompt and prefill ids")
    n_ctx = max(len(prompt) + n, len(prefill))
    llama_cpp, llm, load_s = open_model(args.model, args.threads, not args.no_extra_bufts, n_ctx, False)
    decode, fill = math.inf, math.inf
    for round_ in range(repeats + 1):  # round 0 warms up
        llm.reset()
        stamps = []
        for _token in llm.generate(prompt, temp=0.0, reset=False):  # greedy; EOS does not stop generate()
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        llm.reset()
        start = time.perf_counter()
        llm.eval(prefill)
        if round_ > 0:
            fill = min(fill, time.perf_counter() - start)
            decode = min(decode, stamps[-1] - stamps[0])
    return {
        "load_s": load_s,
        "decode_tok_s": (n - 1) / decode,
        "prefill_tok_s": len(prefill) / fill,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "threads": args.threads,
        "extra_bufts": not args.no_extra_bufts,
        "llama_cpp": llama_cpp.__version__,
    }


def window_nll(scores, targets: list[int]) -> float:
    """Sum of -log softmax(scores[t])[targets[t]] over the rows of scores [n, vocab], in float64."""
    import numpy as np  # llama_cpp's own dependency

    rows = np.asarray(scores, dtype=np.float64)
    top = rows.max(axis=1)
    log_z = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
    return float((log_z - rows[np.arange(len(targets)), targets]).sum())


def ppl(args: argparse.Namespace, spec: dict) -> dict:
    ids, window = [int(i) for i in spec["ids"]], int(spec["window"])
    if window < 2 or len(ids) < 2:
        raise RunnerError(f"ppl needs window >= 2 and at least 2 ids, got window={window}, {len(ids)} ids")
    llama_cpp, llm, _ = open_model(args.model, args.threads, not args.no_extra_bufts, window, True)
    nll_sum, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        scores = llm.scores[: len(chunk)]  # [n, vocab]: row t predicts token t + 1
        nll_sum += window_nll(scores[:-1], chunk[1:])
        count += len(chunk) - 1
    return {"nll_sum": nll_sum, "count": count, "ppl": math.exp(nll_sum / count), "llama_cpp": llama_cpp.__version__}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = read_ids_file(args.ids_file, args.mode)
        result = (speed if args.mode == "speed" else ppl)(args, spec)
    except RunnerError as exc:
        print(f"llama_cpp_runner: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
