"""Speed of a model on this machine, each number measured in a fresh process so that start-up and
peak memory are honest, optionally side by side with llama.cpp on the same GGUF file.

    from qkv.bench import BenchConfig, run_bench
    result = run_bench("smollm2-135m-instruct", BenchConfig(repeats=3), against="llama.cpp")
    print(result.table())

What each number is (best of `repeats` runs after a warm-up, unless said otherwise):

- decode b1: batch-1 greedy decoding after a chat-templated prompt, EOS ignored. The tokens after
  the first, over the time they took: (n - 1) / (t(n) - t(1)), where t(k) is the best time of
  `model.generate(prompt, max_new_tokens=k)` (the first token comes from the prefill).
- prefill: one forward of `prefill_tokens` ids through a fresh cache, logits for the last only.
- batch: `batch_size` copies of the prompt, `batch_new_tokens` each; all new tokens over the whole
  `generate` call (prefill included).
- load: `qkv.load(MODEL)` in a fresh process, with qkv's modules (and transformers' for that
  side) imported before the clock starts, as the peer's runner imports llama_cpp before it times
  `Llama(...)`; the best over the processes that load it. Imports are in the start times.
- peak RSS: the decode process's peak resident memory (`ru_maxrss`: load, warm-up and decoding).
- first/second start: wall seconds from launching a new process to the return of
  `generate(prompt, max_new_tokens=2)`, i.e. to the first token of the decode loop (the step that
  gets compiled): interpreter start, imports, load, prefill and any compiling included. Measured
  twice, one process after the other: the first may compile, the second reuses the on-disk cache.

The peer (llama.cpp through llama-cpp-python) runs `qkv/peers/llama_cpp_runner.py` under its own
interpreter, with the same prompt and prefill ids and the same thread count (n_threads and
n_threads_batch); it reports decode, prefill, load and peak RSS. Progress goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkv.errors import UsageError
from qkv.threads import physical_cores

RUNNER = Path(__file__).parent / "peers" / "llama_cpp_runner.py"
INSTALL_PEER = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python'
PROMPT = "Write a short story about a robot who learns to paint."
# What the prefill measurement feeds: this module's own docstring, cycled to the length asked.
PREFILL_TEXT = __doc__

# (key, unit): the rows of the table, in order; tok/s is higher-better, s and MB lower-better.
METRICS = (
    ("decode_tok_s", "tok/s"),
    ("prefill_tok_s", "tok/s"),
    ("batch_tok_s", "tok/s"),
    ("load_s", "s"),
    ("peak_rss_mb", "MB"),
    ("first_start_s", "s"),
    ("second_start_s", "s"),
)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. threads=None: the machine's physical cores (`physical_cores`)."""

    new_tokens: int = 128
    prefill_tokens: int = 512
    batch_size: int = 16
    batch_new_tokens: int = 64
    repeats: int = 3
    threads: int | None = None
    dtype: str | None = None
    extra_bufts: bool = True  # the peer's extra buffer types (see the runner)

    def __post_init__(self) -> None:
        for name, low in (("new_tokens", 2), ("prefill_tokens", 1), ("batch_size", 1), ("batch_new_tokens", 1),
                          ("repeats", 1), ("threads", 1)):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < low:
                raise UsageError(f"BenchConfig.{name}={value} must be >= {low}")

    @property
    def n_threads(self) -> int:
        return self.threads or physical_cores()

    def labels(self) -> dict[str, str]:
        """Row label of each metric."""
        return {
            "decode_tok_s": "decode b1",
            "prefill_tok_s": f"prefill {self.prefill_tokens}",
            "batch_tok_s": f"batch {self.batch_size}",
            "load_s": "load",
            "peak_rss_mb": "peak RSS",
            "first_start_s": "first start",
            "second_start_s": "second start",
        }


@dataclass
class BenchResult:
    """Numbers per metric key (`METRICS`) for qkv and, when asked, the peer (None where it has none)."""

    config: BenchConfig
    qkv: dict[str, float]
    peer: dict[str, float | None] | None = None
    peer_info: dict[str, Any] | None = None  # the peer's name, version, threads, extra buffer types

    def ratios(self) -> dict[str, float | None]:
        """qkv / peer per metric (None where the peer has no number)."""
        if self.peer is None:
            return {}
        return {k: self.qkv[k] / p if p else None for k, p in self.peer.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config) | {"threads": self.config.n_threads},
            "qkv": self.qkv,
            "peer": self.peer,
            "peer_info": self.peer_info,
            "ratios": self.ratios(),
        }

    def table(self) -> str:
        """Rows per metric; columns qkv, the peer and qkv/peer when there is a peer."""
        peer, ratios = self.peer or {}, self.ratios()
        header = f"{'':14} {'unit':>6} {'qkv':>10}"
        if self.peer is not None:
            header += f" {self.peer_info['name']:>10} {'qkv/peer':>9}"
        lines = [header]
        for key, unit in METRICS:
            line = f"{self.config.labels()[key]:14} {unit:>6} {_number(self.qkv[key]):>10}"
            if self.peer is not None:
                ratio = ratios.get(key)
                line += f" {_number(peer.get(key)):>10} {'-' if ratio is None else f'{ratio:.2f}x':>9}"
            lines.append(line)
        if self.peer is not None:
            lines.append("tok/s: higher is better; s and MB: lower is better")
        return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def bench_ids(source: str | os.PathLike, prefill_tokens: int) -> tuple[list[int], list[int]]:
    """(chat-templated prompt ids, `prefill_tokens` ids of English text) from the model's tokenizer;
    a tokenizer without a chat template gets the plain prompt."""
    from qkv.tokenizer import load_tokenizer

    tok = load_tokenizer(source)
    if tok.chat_template:
        prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True)
    else:
        prompt = tok.encode(PROMPT)
    text = tok.encode(PREFILL_TEXT, add_special_tokens=False)
    return list(prompt), [text[i % len(text)] for i in range(prefill_tokens)]


def gguf_file(source: str | os.PathLike) -> Path:
    """The .gguf file that `source` names (a file, a directory holding one, or a known name);
    a UsageError otherwise (a peer like llama.cpp reads GGUF only)."""
    from qkv import hub

    try:
        path = hub.resolve(source)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    found = sorted(path.rglob("*.gguf")) if path.is_dir() else [path]
    if len(found) == 1 and found[0].is_file():
        with open(found[0], "rb") as f:
            if f.read(4) == b"GGUF":
                return found[0]
    raise UsageError(
        f"--against llama.cpp needs a GGUF model (a .gguf file, or a directory holding one); {source} is not"
    )


def default_peer_python() -> str:
    """The current interpreter when it can import llama_cpp; else a UsageError on --peer-python."""
    check_peer_python(sys.executable)
    return sys.executable


def check_peer_python(python: str) -> None:
    """A UsageError unless `python` runs and imports llama_cpp."""
    try:
        ok = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    except OSError:
        ok = False
    if not ok:
        raise UsageError(
            f"--peer-python {python} cannot import llama_cpp; pass --peer-python PATH of an interpreter that "
            f"has it, or install it there with: {INSTALL_PEER}"
        )


def _progress(message: str) -> None:
    print(f"qkv bench: {message}", file=sys.stderr, flush=True)


def _run_worker(job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (`python -m qkv.bench JOB`) -> its JSON result;
    the worker's bad-input errors come back as UsageError, anything else as RuntimeError."""
    cmd = [sys.executable, "-m", "qkv.bench", json.dumps(job)]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if proc.returncode == 2 and "error" in result:
        raise UsageError(result["error"])
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"the {job['kind']} measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return result | {"launched": started}


def measure(
    source: str | os.PathLike,
    config: BenchConfig,
    prompt: list[int],
    prefill: list[int],
    backend: str = "qkv",
    env: dict[str, str] | None = None,
    progress: Callable[[str], None] = _progress,
) -> dict[str, float]:
    """Every metric of `METRICS` for `source` through `backend` ("qkv", or "transformers" for an HF
    directory), each measurement in its own process; `env` is added to their environment."""
    job = {"source": str(source), "backend": backend, "prompt": prompt, "threads": config.n_threads,
           "dtype": config.dtype, "repeats": config.repeats}  # fmt: skip
    out: dict[str, float] = {}
    loads = []
    for key in ("first_start_s", "second_start_s"):  # first, so that the first start finds the cache as it is
        progress(f"{backend}: {key.removesuffix('_s').replace('_', ' ')} (new process to the first decoded token)")
        r = _run_worker(job | {"kind": "start"}, env)
        out[key] = r["at"] - r["launched"]
        loads.append(r["load_s"])
        progress(f"{backend}:   {key} {out[key]:.2f}")
    steps = (
        ("decode", {"new_tokens": config.new_tokens}, f"decode b1, {config.new_tokens} tokens"),
        ("prefill", {"prefill": prefill}, f"prefill {len(prefill)} tokens"),
        ("batch", {"batch_size": config.batch_size, "new_tokens": config.batch_new_tokens},
         f"batch {config.batch_size} x {config.batch_new_tokens} tokens"),
    )  # fmt: skip
    for kind, extra, what in steps:
        progress(f"{backend}: {what}, best of {config.repeats}")
        r = _run_worker(job | extra | {"kind": kind}, env)
        loads.append(r["load_s"])
        out |= {k: v for k, v in r.items() if k in dict(METRICS)}
        progress(f"{backend}:   " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k in dict(METRICS)))
    out["load_s"] = min(loads)
    return {key: out[key] for key, _ in METRICS}


def measure_peer(
    gguf: Path,
    config: BenchConfig,
    prompt: list[int],
    prefill: list[int],
    python: str,
    progress: Callable[[str], None] = _progress,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """llama.cpp's numbers (None for the metrics it does not measure) and its settings."""
    progress(f"llama.cpp: decode b1, prefill {len(prefill)}, load (runner under {python}), best of {config.repeats}")
    spec = {"prompt": prompt, "prefill": prefill, "new_tokens": config.new_tokens, "repeats": config.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(spec))
        cmd = [python, str(RUNNER), "speed", "--model", str(gguf), "--threads", str(config.n_threads),
               "--ids-file", str(ids_file)] + ([] if config.extra_bufts else ["--no-extra-bufts"])  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the llama.cpp runner failed (exit {proc.returncode}): {proc.stderr.strip()[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    progress(
        "llama.cpp:   " + ", ".join(f"{k} {r[k]:.2f}" for k in ("load_s", "decode_tok_s", "prefill_tok_s", "maxrss_mb"))
    )
    numbers = dict.fromkeys(dict(METRICS)) | {  # None where the runner has no such measurement
        "decode_tok_s": r["decode_tok_s"],
        "prefill_tok_s": r["prefill_tok_s"],
        "load_s": r["load_s"],
        "peak_rss_mb": r["maxrss_mb"],
    }
    info = {"name": "llama.cpp", "llama_cpp": r["llama_cpp"], "threads": r["threads"], "extra_bufts": r["extra_bufts"]}
    return numbers, info


def run_bench(
    source: str | os.PathLike,
    config: BenchConfig | None = None,
    against: str | None = None,
    peer_python: str | None = None,
) -> BenchResult:
    """Measure qkv on `source` (anything `qkv.load` takes) and, with against="llama.cpp", the same
    GGUF file in llama.cpp under `peer_python` (default: this interpreter, if it has llama_cpp)."""
    config = config or BenchConfig()
    if against not in (None, "llama.cpp"):
        raise UsageError(f"--against {against!r}: the only peer is 'llama.cpp'")
    gguf = gguf_file(source) if against else None
    if against:
        if peer_python is None:
            peer_python = default_peer_python()
        else:
            check_peer_python(peer_python)
    prompt, prefill = bench_ids(source, config.prefill_tokens)
    _progress(f"{len(prompt)}-token prompt, {config.n_threads} threads")
    result = BenchResult(config, measure(source, config, prompt, prefill))
    if gguf is not None:
        result.peer, result.peer_info = measure_peer(gguf, config, prompt, prefill, peer_python)
    return result


# ---- the worker: one measurement in this fresh process ------------------------------------------


def best_time(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed call unless warm_up=False."""
    if warm_up:
        fn()  # warm-up (and compiling, where the path compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _import_backend(job: dict[str, Any]) -> None:
    """The library the job loads with, imported (what `_load` then finds in sys.modules)."""
    if job["backend"] == "transformers":
        import transformers  # noqa: F401
    else:
        import qkv.loading  # noqa: F401


def _load(job: dict[str, Any]):
    """(model, generate(ids, n), prefill(ids)) for the job's backend."""
    import torch

    if job["backend"] == "transformers":
        import transformers

        dtype = getattr(torch, job["dtype"] or "float32")
        model = transformers.AutoModelForCausalLM.from_pretrained(job["source"], dtype=dtype).eval()

        def generate(ids, n):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        def prefill(ids):
            return model(ids, use_cache=True, logits_to_keep=1).logits

        return model, generate, prefill
    from qkv.loading import load

    model = load(job["source"], dtype=job["dtype"])

    def generate(ids, n):
        return model.generate(ids, max_new_tokens=n, eos_token_id=[])

    def prefill(ids):
        return model.decode(ids, model.new_cache(ids.shape[0], ids.shape[1]), logits_to_keep=1)

    return model, generate, prefill


def _worker(job: dict[str, Any]) -> dict[str, float]:
    import resource

    import torch

    os.environ["QKV_THREADS"] = str(job["threads"])  # what qkv.load sets torch's threads to
    torch.set_num_threads(job["threads"])
    _import_backend(job)
    start = time.perf_counter()
    _, generate, prefill = _load(job)
    out = {"load_s": time.perf_counter() - start}
    prompt = torch.tensor([job["prompt"]])
    repeats = job["repeats"]
    with torch.no_grad():
        if job["kind"] == "start":
            generate(prompt, 2)
            out["at"] = time.time()
        elif job["kind"] == "decode":
            n = job["new_tokens"]
            t_n, t_1 = best_time(lambda: generate(prompt, n), repeats), best_time(lambda: generate(prompt, 1), repeats)
            out["decode_tok_s"] = (n - 1) / (t_n - t_1) if t_n > t_1 else math.inf
            out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        elif job["kind"] == "prefill":
            ids = torch.tensor([job["prefill"]])
            out["prefill_tok_s"] = ids.shape[1] / best_time(lambda: prefill(ids), repeats)
        elif job["kind"] == "batch":
            ids = prompt.expand(job["batch_size"], -1).contiguous()
            n = job["new_tokens"]
            out["batch_tok_s"] = ids.shape[0] * n / best_time(lambda: generate(ids, n), repeats)
    return out


def main(argv: list[str]) -> int:
    """`python -m qkv.bench JOB`: run one measurement; print its JSON line (an error: {"error"}, exit 2)."""
    from qkv.errors import QkvError

    try:
        out = _worker(json.loads(argv[0]))
    except (QkvError, FileNotFoundError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
