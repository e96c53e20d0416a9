"""Long context on SmolLM2-135M-Instruct (bf16): prefill time and memory against transformers, and
perplexity past the trained 8k context under RoPE scaling.

    python benchmarks/long_context.py [--lengths 2048,4096,8192,16384,32768] [--chunk 512]
                                      [--plot docs/long_context_memory.png] [--threads N]
    python benchmarks/long_context.py --perplexity [--ppl-length 16384] [--chunk 512]

Memory (the default): for each length, the prefill of a prompt of that many tokens of held-out
text (`qkv.evaluation.heldout_text`) and its first new token, greedily: qkv's
`generate(max_new_tokens=1)` (the prompt fed `--chunk` tokens per forward through the KV cache)
against transformers' `generate(max_new_tokens=1)` with SDPA attention, on the very same weights
(qkv loads the GGUF file dequantized to bf16 and exports them as a Hugging Face directory, which
transformers loads as a plain LlamaForCausalLM in bf16). Each measurement runs in a fresh process
of its own, which loads the model, warms up on a 64-token prompt, then measures:
- time: wall seconds of the call, and the CPU seconds of the process in it (all threads; on a
  shared machine the CPU time is the steadier number, wall time counts the waits for a core);
- peak: the activation peak, the process's peak resident memory during the call (VmHWM, reset to
  the current RSS through /proc/self/clear_refs just before it) minus its RSS just before it. The
  loaded model is not counted; the KV cache the call builds is.
Past SmolLM2's 8,192 positions qkv needs a stretched context to accept the prompt: the model gets
linear RoPE scaling (same compute as none); transformers checks no length and runs unscaled. The
table gives each side's numbers and the ratio qkv / transformers; the plot draws peak vs length.

Perplexity (--perplexity): the first `--ppl-length` tokens of the held-out text, scored in windows
of 8,192 (the trained context, unscaled: the baseline) and as one window of `--ppl-length` tokens,
unscaled and with linear, dynamic NTK and YaRN scaling by `--ppl-length` / 8192, each window fed
`--chunk` tokens per forward through the cache (`qkv.evaluation.perplexity(chunk=)`). "none" at 16k runs the model
past its trained positions unscaled (its context check lifted), the baseline that scaling is for.
Under dynamic NTK a window past 8k runs in one forward (every position takes the window's base, as
in transformers), its logits made `--chunk` rows at a time.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
TRAINED = 8192  # SmolLM2's max_position_embeddings
DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
WARM_UP = 64  # tokens of the warm-up prompt in each worker
SIDES = ("qkv", "transformers")


def progress(message: str) -> None:
    print(f"long_context: {message}", file=sys.stderr, flush=True)


# -- one measurement in a process of its own ----------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "reset the peak resident set size to the current RSS" (proc(5))


def worker(side: str, length: int, chunk: int, ids_path: str, hf_dir: str, threads: int | None) -> dict:
    """Load the model on `side`, warm up, then prefill `length` tokens and pick one: time and peak."""
    import os

    import torch

    if threads:
        os.environ["QKV_THREADS"] = str(threads)  # else qkv sets one thread per physical core on loading
        torch.set_num_threads(threads)
    ids = torch.tensor([json.loads(Path(ids_path).read_text())[:length]])
    if side == "qkv":
        import qkv
        from qkv.generation import scale_rope
        from qkv.memory import trim

        model = qkv.load(MODEL, dtype="bfloat16", dequantize=True)
        if length >= TRAINED:  # the prompt plus one new token must fit the context
            scale_rope(model, f"linear:{2 ** (length // TRAINED).bit_length()}")

        def run(x: torch.Tensor) -> torch.Tensor:
            return model.generate(x, max_new_tokens=1, prefill_chunk=chunk, eos_token_id=[])
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        trim = None

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0)

    run(ids[:, :WARM_UP])
    gc.collect()
    if trim is not None:
        trim()
    _reset_peak()
    before = _status_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    out = run(ids)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_mb": (_status_kib("VmHWM") - before) / 1024,
        "model_rss_mb": before / 1024,
        "token": int(out[0, -1]),
        "threads": torch.get_num_threads(),
    }


def run_worker(side: str, length: int, chunk: int, ids_path: Path, hf_dir: Path, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--length", str(length), "--chunk", str(chunk),
           "--ids", str(ids_path), "--hf-dir", str(hf_dir)]  # fmt: skip
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} at {length} tokens failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# -- the memory table and plot ----------------------------------------------------------------------


def prompt_ids(n: int) -> list[int]:
    """`n` tokens of the held-out text (repeated if it runs short)."""
    import qkv
    from qkv.evaluation import heldout_text

    ids = qkv.load_tokenizer(MODEL).encode(heldout_text(160_000))
    return (ids * (n // len(ids) + 1))[:n]


def table(rows: list[dict]) -> str:
    head = (f"{'tokens':>7} | {'qkv s':>7} {'cpu s':>7} {'MB':>6} | {'transformers s':>14} {'cpu s':>7} {'MB':>6} | "
            f"{'wall ratio':>10} {'cpu ratio':>9} {'memory ratio':>12} | "
            f"{'qkv MB/1k tok':>13} {'same token':>10}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        q, t = r["qkv"], r["transformers"]
        lines.append(
            f"{r['length']:>7} | {q['seconds']:>7.1f} {q['cpu_seconds']:>7.1f} {q['peak_mb']:>6.0f} | "
            f"{t['seconds']:>14.1f} {t['cpu_seconds']:>7.1f} {t['peak_mb']:>6.0f} | "
            f"{q['seconds'] / t['seconds']:>10.2f} {q['cpu_seconds'] / t['cpu_seconds']:>9.2f} "
            f"{q['peak_mb'] / t['peak_mb']:>12.2f} | "
            f"{q['peak_mb'] / r['length'] * 1000:>13.1f} {'yes' if q['token'] == t['token'] else 'no':>10}"
        )
    return "\n".join(lines)


def draw(rows: list[dict], path: Path, chunk: int) -> None:
    """Peak activation memory vs prompt length, both sides, written atomically as a PNG."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from qkv.atomic import atomic_write_bytes

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lengths = [r["length"] for r in rows]
    for side, label, color in (("qkv", f"qkv (chunked prefill, {chunk})", "#4c72b0"),
                               ("transformers", "transformers (SDPA)", "#dd8452")):  # fmt: skip
        peaks = [r[side]["peak_mb"] for r in rows]
        ax.plot(lengths, peaks, marker="o", color=color, label=label)
        for x, y in zip(lengths, peaks, strict=True):
            ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("peak RSS above the loaded model (MB)")
    ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M bf16: prefill + first token, peak memory", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def memory(args: argparse.Namespace) -> int:
    import qkv
    from qkv.checkpoints.hf import export_hf

    progress(f"tokenizing the held-out text ({max(args.lengths)} tokens)")
    ids = prompt_ids(max(args.lengths))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, hf_dir = Path(tmp) / "ids.json", Path(tmp) / "hf"
        ids_path.write_text(json.dumps(ids))
        progress("exporting the bf16 weights for transformers")
        export_hf(qkv.load(MODEL, dtype="bfloat16", dequantize=True), hf_dir)
        for length in args.lengths:
            row = {"length": length}
            for side in SIDES:
                progress(f"{length} tokens: {side} ...")
                row[side] = run_worker(side, length, args.chunk, ids_path, hf_dir, args.threads)
                r = row[side]
                progress(f"{length} tokens: {side}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU), "
                         f"peak {r['peak_mb']:.0f} MB")  # fmt: skip
            rows.append(row)
    print(f"SmolLM2-135M-Instruct bf16, prefill + 1 token, qkv prefill chunk {args.chunk}, "
          f"torch threads {rows[0]['qkv']['threads']}; peak = RSS above the loaded model")  # fmt: skip
    print(table(rows))
    if args.plot:
        draw(rows, Path(args.plot), args.chunk)
        print(f"plot: {args.plot}")
    return 0


# -- perplexity past the trained context -------------------------------------------------------------


def perplexities(args: argparse.Namespace) -> int:
    import torch

    import qkv
    from qkv.evaluation import heldout_text, perplexity
    from qkv.generation import scale_rope

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.ppl_length
    factor = n / TRAINED
    ids = qkv.load_tokenizer(MODEL).encode(heldout_text())
    if len(ids) < n:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than --ppl-length {n}")
    ids = ids[:n]
    print(f"SmolLM2-135M-Instruct bf16: perplexity of the first {n} tokens of the held-out text, "
          f"fed {args.chunk} tokens per forward")  # fmt: skip
    head = f"{'scaling':>12} | {'window':>7} | {'perplexity':>10} | {'seconds':>7}"
    print(head + "\n" + "-" * len(head), flush=True)
    # The trained context first (the baseline), then one window of n tokens: unscaled, then each scaling.
    runs = [("none", TRAINED)] + [(kind, n) for kind in ("none", "linear", "dynamic", "yarn")]
    for kind, window in [(kind, window) for kind, window in runs if kind in args.ppl_scalings]:
        model = qkv.load(MODEL, dtype="bfloat16", dequantize=True)
        name = kind
        if kind == "none" and window > TRAINED:  # lift the context check only: positions past 8k run unscaled
            for module in model.modules():
                if getattr(module, "config", None) is not None:
                    module.config = module.config.replace(max_seq_len=window)
        elif kind != "none":
            name = f"{kind}:{factor:g}"
            scale_rope(model, name)
        progress(f"{name}, windows of {window} ...")
        start = time.perf_counter()
        ppl = perplexity(model, ids, window=window, chunk=args.chunk).ppl
        seconds = time.perf_counter() - start
        print(f"{name:>12} | {window:>7} | {ppl:>10.3f} | {seconds:>7.0f}", flush=True)
    return 0


def lengths_argument(value: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give token counts separated by commas, e.g. 2048,8192") from None
    if not lengths or min(lengths) <= WARM_UP:
        raise argparse.ArgumentTypeError(f"{value!r}: each length must be more than {WARM_UP} tokens")
    return lengths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=lengths_argument, default=DEFAULT_LENGTHS, help="e.g. 2048,8192")
    parser.add_argument("--chunk", type=int, default=512, help="qkv's prefill chunk (tokens per forward)")
    parser.add_argument("--plot", default="docs/long_context_memory.png", help="the PNG to draw ('' for none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each process")
    parser.add_argument("--perplexity", action="store_true", help="measure perplexity past 8k instead")
    parser.add_argument("--ppl-length", type=int, default=16384, help="tokens scored with --perplexity")
    parser.add_argument("--ppl-scalings", type=lambda v: v.split(","), default=["none", "linear", "dynamic", "yarn"],
                        help="which of none,linear,dynamic,yarn --perplexity runs")  # fmt: skip
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.length, args.chunk, args.ids, args.hf_dir, args.threads)))
        return 0
    return perplexities(args) if args.perplexity else memory(args)


if __name__ == "__main__":
    sys.exit(main())
