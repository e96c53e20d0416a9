"""Training speed: qkv's `Trainer` vs nanoGPT's `train.py`, on nanoGPT's CPU benchmark shape.

    python benchmarks/train.py [--iters 8] [--warmup 3] [--repeats 2] [--threads N] [--compile]
                               [--sides nanogpt,fp32,bf16] [--chars 1000000]
    python benchmarks/train.py --interleaved [--threads 1] [--iters 8] [--sides ...]   # a busy machine
    python benchmarks/train.py --optimizer [--threads N]    # AdamW alone: foreach vs fused
    python benchmarks/train.py --linear [--threads N]       # the linears' fp32 fwd+bwd: MKL vs oneDNN
    python benchmarks/train.py --attention [--threads N]    # attention fwd+bwd: fused kernel vs block-causal
    python benchmarks/train.py --loss [--threads N]         # the loss at SmolLM2's vocabulary: peak memory, time

The shape is nanoGPT's README CPU example scaled to its "baby GPT": char-level, GPT-2 style
(learned positions, LayerNorm, exact GELU MLP, tied head), 4 layers, 4 heads, d_model 256, block
256, batch 16, no bias, no dropout, AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1) with grad
clipping at 1.0. Every side is its own fresh process with the same thread count (OMP_NUM_THREADS):
- nanogpt: nanoGPT's unchanged `train.py` (vendored in benchmarks/peers/nanogpt, commit 3adf61e,
  MIT) with `--device=cpu --compile=False --dtype=float32`; its CPU path runs fp32 eager whatever
  --dtype says. Its own per-iteration times ("iter N: ... time X ms") are read from its output.
- fp32 / bf16: qkv's `Trainer` (bf16 = `TrainingConfig(bf16=True)`: bfloat16 autocast, fp32
  weights and optimizer) on the same `ModelConfig`-built GPT, timed around `Trainer.train`;
A qkv side may carry flags, e.g. `--sides nanogpt,fp32,bf16,bf16+fusedattn`, that take one lever
back out: +foreach (AdamW's foreach update, not the fused kernel), +plainloss (the loss as
`F.cross_entropy` on float32 copies of the shifted logits), +fusedattn (torch's fused attention
kernel, not the block-causal matmuls of `qkv.nn.causal_attention`, which bf16 training takes),
+mkl (the float32 linears in torch's own matmul, MKL's, not oneDNN's: `qkv.nn.linear`); or put
one in: +compile (`TrainingConfig(compile=True)`: torch.compile of the training step; its first
step, trace + compile from an empty inductor cache + run, is printed separately: it is paid once
per process). --compile adds fp32+compile and bf16+compile.

Data: char-level ids of the Python standard library's sources (the text qkv's demo trains on),
written in nanoGPT's format (train.bin / val.bin as uint16, meta.pkl with the vocabulary), the
first 90% for training. nanoGPT draws each batch's windows with `torch.randint`; qkv's side reads
the same train.bin with the same draw (its own generator, seed 1337), so both see windows of the
same characters by the same rule, though not the same windows: nanoGPT's draws share its global
generator with its weight initialisation.

--interleaved, for a machine shared with other work: every side in this one process, a step of
each in turn, --iters rounds (after --warmup), timed in CPU seconds of the process
(`time.process_time`), which other processes' load barely moves at --threads 1 (with more threads,
OpenMP's waiting counts too). nanoGPT's side there is its model.py and optimizer with train.py's
step rebuilt around them (get_batch, forward, backward, clip, AdamW, zero_grad), not its train.py.
Prints per side the min and median CPU ms/step and the median and range of nanoGPT/side per round.
Only the flags +mkl, +foreach and +compile (which do not patch modules for the whole process) mix.

A round runs each side once (in the order given); --repeats rounds alternate them, so a load
from other processes hits every side alike. Per side: the median ms/iter of the timed iterations
(after --warmup), best over the rounds. Prints that table and the ratios nanoGPT/qkv (higher:
qkv faster). Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

NANOGPT = Path(__file__).resolve().parent / "peers" / "nanogpt"
SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=16)
HYPER = dict(learning_rate=1e-3, min_lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)
SIDES = ("nanogpt", "fp32", "bf16")
# A qkv side may take levers back out: "bf16+foreach+fusedattn" is the bf16 side before them.
FLAGS = {
    "foreach": "AdamW's foreach update instead of the fused kernel (the optimizer before the fused lever)",
    "plainloss": "the loss as F.cross_entropy on float32 copies of the shifted logits (before the chunked loss)",
    "fusedattn": "torch's fused attention kernel instead of qkv.nn.causal_attention's blocks (before that lever)",
    "mkl": "the float32 linears through torch's matmul (MKL) instead of oneDNN's (before that lever)",
    "compile": "TrainingConfig(compile=True): the training step torch.compile'd (its first step compiles)",
}
ITER_LINE = re.compile(r"^iter (\d+): loss ([0-9.]+), time ([0-9.]+)ms")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- data --------------------------------------------------------------------------------------
def build_dataset(directory: Path, n_chars: int) -> int:
    """Write nanoGPT's char-level files (train.bin, val.bin, meta.pkl) of the first `n_chars`
    characters of the standard library's sources into `directory` -> the vocabulary size."""
    from qkv.demo import stdlib_sources

    parts, total = [], 0
    for path in stdlib_sources(max_bytes=4 * n_chars):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= n_chars:
            break
    data = "".join(parts)[:n_chars]
    chars = sorted(set(data))  # nanoGPT's data/shakespeare_char/prepare.py from here on
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in data], dtype=np.uint16)
    split = int(len(ids) * 0.9)
    directory.mkdir(parents=True, exist_ok=True)
    ids[:split].tofile(directory / "train.bin")
    ids[split:].tofile(directory / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    (directory / "meta.pkl").write_bytes(pickle.dumps(meta))
    return len(chars)


class WindowSource:
    """Batches [B, T] of random windows of train.bin, drawn as nanoGPT's `get_batch` draws them
    (`torch.randint(len(data) - T, (B,))`), from a generator of its own; a `BatchSource`."""

    def __init__(self, path: Path, batch_size: int, block_size: int, seed: int = 1337) -> None:
        import torch

        self.data = torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))
        self.batch_size, self.block_size = batch_size, block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(block_size)

    def next_batch(self):
        import torch

        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.generator)
        return self.data[ix[:, None] + self.offsets]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# -- the two sides -----------------------------------------------------------------------------
def nanogpt_command(data_dir: Path, out_dir: Path, iters: int) -> list[str]:
    shape = {**SHAPE, **HYPER}
    args = [f"--{k}={v}" for k, v in shape.items()]
    return [
        sys.executable, "train.py", "--device=cpu", "--compile=False", "--dtype=float32", "--bias=False",
        "--dropout=0.0", "--gradient_accumulation_steps=1", f"--dataset={data_dir}", f"--out_dir={out_dir}",
        f"--max_iters={iters - 1}", f"--lr_decay_iters={iters}", "--warmup_iters=0", "--eval_interval=1000000",
        "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False", *args,
    ]  # fmt: skip


def run_nanogpt(data_dir: Path, out_dir: Path, iters: int, env: dict[str, str]) -> list[tuple[float, float]]:
    """nanoGPT's train.py for `iters` iterations -> [(ms, loss)] per iteration, as it prints them."""
    proc = subprocess.run(
        nanogpt_command(data_dir, out_dir, iters), cwd=NANOGPT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [ITER_LINE.match(line) for line in proc.stdout.splitlines()]
    rows = [(float(m.group(3)), float(m.group(2))) for m in rows if m]
    if len(rows) != iters:
        raise RuntimeError(f"expected {iters} 'iter N: ... time X ms' lines from nanoGPT, got:\n{proc.stdout[-3000:]}")
    return rows


def build_model(vocab_size: int):
    """qkv's GPT of the benchmark shape: the gpt2 preset without biases, exact GELU as nanoGPT's."""
    from qkv.config import ModelConfig
    from qkv.models import DecoderLM

    cfg = ModelConfig.from_name(
        "gpt2", vocab_size=vocab_size, d_model=SHAPE["n_embd"], n_layers=SHAPE["n_layer"], n_heads=SHAPE["n_head"],
        max_seq_len=SHAPE["block_size"], mlp="gelu", qkv_bias=False, attn_out_bias=False, mlp_bias=False,
        norm_bias=False, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return DecoderLM(cfg)


def plain_loss(logits, labels):
    """The loss before the chunked one: float32 copies of the shifted logits into F.cross_entropy."""
    import torch.nn.functional as F

    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1).long(), ignore_index=-100)


def fused_attention_only() -> None:
    """Take the block-causal lever back out: every attention call takes torch's fused kernel (as
    before `qkv.nn.causal_attention` was wired into `qkv.nn.attention._sdpa`)."""
    import qkv.nn.attention as attention

    attention.causal_attention_fits = lambda q, k, dropout_p: False


def qkv_worker(side: str, data_dir: Path, iters: int, threads: int) -> dict:
    """One qkv side in this process -> {"rows": [(ms, loss)], "compile_s": ...}."""
    import torch

    import qkv.models.decoder as decoder
    from qkv.training import Trainer, TrainingConfig
    from qkv.training.optim import build_optimizer

    side, *flags = side.split("+")
    if "plainloss" in flags:
        decoder.next_token_loss = plain_loss
    if "fusedattn" in flags:
        fused_attention_only()
    if "mkl" in flags:
        import qkv.nn.linear as linear

        linear._AVAILABLE = False  # every Linear takes F.linear, i.e. torch's matmul
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    model = build_model(pickle.loads((data_dir / "meta.pkl").read_bytes())["vocab_size"])
    config = TrainingConfig(
        steps=iters, lr=HYPER["learning_rate"], min_lr=HYPER["min_lr"], weight_decay=HYPER["weight_decay"],
        betas=(HYPER["beta1"], HYPER["beta2"]), grad_clip=HYPER["grad_clip"], bf16=side == "bf16", progress=False,
        compile="compile" in flags,
    )  # fmt: skip
    source = WindowSource(data_dir / "train.bin", SHAPE["batch_size"], SHAPE["block_size"])
    trainer = Trainer(model, config, source)
    if "foreach" in flags:
        trainer.optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas, fused=False)
    rows = []
    for step in range(1, iters + 1):
        start = time.perf_counter()
        record = trainer.train(until=step)[-1]
        rows.append(((time.perf_counter() - start) * 1e3, record["loss"]))
    # The first step of a compiled side traces and compiles (from an empty inductor cache).
    return {"rows": rows, "compile_s": rows[0][0] / 1e3 if config.compile else None}


def run_qkv(side: str, data_dir: Path, iters: int, threads: int, env: dict[str, str]) -> dict:
    """`qkv_worker` in a fresh process (the same start as nanoGPT's side)."""
    cmd = [sys.executable, __file__, "--worker", side, "--data", str(data_dir), "--iters", str(iters),
           "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"qkv {side} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nanogpt_step(data_dir: Path, vocab_size: int) -> Callable[[], float]:
    """nanoGPT's training step in this process: its model.py and `configure_optimizers` with the
    step of its train.py's loop (get_batch as it draws, forward, backward, clip, AdamW, zero_grad)."""
    import torch

    sys.path.insert(0, str(NANOGPT))
    from model import GPT, GPTConfig

    config = GPTConfig(block_size=SHAPE["block_size"], vocab_size=vocab_size, n_layer=SHAPE["n_layer"],
                       n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"], dropout=0.0, bias=False)  # fmt: skip
    model = GPT(config).train()
    optimizer = model.configure_optimizers(HYPER["weight_decay"], HYPER["learning_rate"],
                                           (HYPER["beta1"], HYPER["beta2"]), "cpu")  # fmt: skip
    data = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
    B, T = SHAPE["batch_size"], SHAPE["block_size"]

    def step() -> float:
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def qkv_step(side: str, data_dir: Path, vocab_size: int) -> Callable[[], float]:
    """One qkv side's training step (`Trainer.train` for one more step) in this process."""
    import torch

    import qkv.nn.linear as linear
    from qkv.training import Trainer, TrainingConfig
    from qkv.training.optim import build_optimizer

    base, *flags = side.split("+")
    config = TrainingConfig(
        steps=10**9, lr=HYPER["learning_rate"], min_lr=HYPER["min_lr"], weight_decay=HYPER["weight_decay"],
        betas=(HYPER["beta1"], HYPER["beta2"]), grad_clip=HYPER["grad_clip"], bf16=base == "bf16", progress=False,
        compile="compile" in flags,
    )  # fmt: skip
    torch.manual_seed(1337)
    model = build_model(vocab_size)
    trainer = Trainer(model, config, WindowSource(data_dir / "train.bin", SHAPE["batch_size"], SHAPE["block_size"]))
    if "foreach" in flags:
        trainer.optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas, fused=False)
    onednn = linear._AVAILABLE and "mkl" not in flags

    def step() -> float:
        linear._AVAILABLE, before = onednn, linear._AVAILABLE  # +mkl: F.linear for this side's steps only
        try:
            return trainer.train(until=trainer.step + 1)[-1]["loss"]
        finally:
            linear._AVAILABLE = before

    return step


def interleaved(sides: list[str], data_dir: Path, vocab_size: int, iters: int, warmup: int) -> str:
    """Every side in this process, one step of each in turn -> the table of CPU ms per step."""
    steps = {}
    for side in sides:
        steps[side] = nanogpt_step(data_dir, vocab_size) if side == "nanogpt" else qkv_step(side, data_dir, vocab_size)
        start = time.perf_counter()
        steps[side]()
        log(f"{side}: first step {time.perf_counter() - start:.1f} s (wall)")
    for _ in range(max(0, warmup - 1)):
        for step in steps.values():
            step()
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(iters):
        for side, step in steps.items():
            start = time.process_time()
            step()
            cpu[side].append((time.process_time() - start) * 1e3)
        log(f"round {round_ + 1}/{iters}: " + ", ".join(f"{s} {cpu[s][-1]:.0f}" for s in sides))
    lines = [f"{'side':16} {'CPU ms/step: min':>16} {'median':>8}  nanoGPT/side per round: median (range)"]
    for side in sides:
        row = f"{side:16} {min(cpu[side]):16.1f} {statistics.median(cpu[side]):8.1f}"
        if "nanogpt" in cpu and side != "nanogpt":
            ratios = [n / q for n, q in zip(cpu["nanogpt"], cpu[side])]
            row += f"  {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        lines.append(row)
    return "\n".join(lines)


def optimizer_times(threads: int, repeats: int = 20) -> dict[str, float]:
    """Best ms of one AdamW update (`build_optimizer`) over the benchmark model's parameters, with
    torch's foreach implementation and with its fused kernel."""
    import torch

    from qkv.training.optim import build_optimizer

    torch.set_num_threads(threads)
    model = build_model(96)
    times = {}
    for name, fused in (("foreach", False), ("fused", True)):
        optimizer = build_optimizer(model, lr=1e-3, fused=fused)
        best = float("inf")
        for _ in range(repeats):
            for p in model.parameters():
                p.grad = torch.full_like(p, 1e-3)
            start = time.perf_counter()
            optimizer.step()
            best = min(best, time.perf_counter() - start)
        times[name] = best * 1e3
    return times


def linear_times(threads: int, repeats: int = 10) -> dict[str, tuple[float, float]]:
    """Best ms of one float32 linear forward + backward (dx and dw) at each of the benchmark
    model's shapes (16 x 256 tokens): torch's `F.linear` (MKL's matmul) vs `qkv.nn.linear`'s
    `float32_linear` (oneDNN's), alternated -> {"in -> out": (F.linear ms, float32_linear ms)}."""
    import torch
    import torch.nn.functional as F

    from qkv.nn.linear import float32_linear

    torch.set_num_threads(threads)
    tokens, d = SHAPE["batch_size"] * SHAPE["block_size"], SHAPE["n_embd"]
    times = {}
    for n_in, n_out in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d), (d, 96)):
        x = torch.randn(tokens, n_in, requires_grad=True)
        w = (torch.randn(n_out, n_in) * 0.02).requires_grad_(True)
        grad = torch.randn(tokens, n_out)
        best = [float("inf"), float("inf")]
        for _ in range(repeats + 1):
            for i, fn in enumerate((F.linear, float32_linear)):
                start = time.perf_counter()
                fn(x, w).backward(grad)
                best[i] = min(best[i], time.perf_counter() - start)
        times[f"{n_in} -> {n_out}"] = (best[0] * 1e3, best[1] * 1e3)
    return times


def attention_times(threads: int, repeats: int = 7) -> dict[str, float]:
    """Best ms of one causal self-attention forward + backward at the benchmark's shape
    [16, 4, 256, 64], float32 and bfloat16: torch's fused kernel (`F.scaled_dot_product_attention`,
    is_causal) vs qkv's block-causal `causal_attention`, the latter at several block sizes."""
    import torch
    import torch.nn.functional as F

    import qkv.nn.causal_attention as ca

    torch.set_num_threads(threads)
    B, H, T, hd = SHAPE["batch_size"], SHAPE["n_head"], SHAPE["block_size"], SHAPE["n_embd"] // SHAPE["n_head"]
    default_block = ca.BLOCK
    sides = {"sdpa": (None, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
    for block in sorted({32, 64, 128, T, default_block}):
        name = "block-causal" + ("" if block == default_block else f" (BLOCK={block})")
        sides[name] = (block, lambda q, k, v: ca.causal_attention(q, k, v, hd**-0.5))
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(B, T, H, hd, dtype=dtype).transpose(1, 2).requires_grad_(True) for _ in range(3))
        grad = torch.randn(B, H, T, hd, dtype=dtype)
        for name, (block, fn) in sides.items():
            ca.BLOCK = block or default_block
            best = float("inf")
            for _ in range(repeats + 1):
                start = time.perf_counter()
                fn(q, k, v).backward(grad)
                best = min(best, time.perf_counter() - start)
            times[f"{name} {str(dtype).removeprefix('torch.')}"] = best * 1e3
    ca.BLOCK = default_block
    return times


LOSS_SHAPE = (8, 512, 49152)  # batch, tokens, vocabulary: a SmolLM2 fine-tuning step's logits


def loss_worker(kind: str) -> dict[str, float]:
    """Forward + backward of the loss alone over bf16 logits of LOSS_SHAPE in this process ->
    the peak resident memory it added (MB, from the kernel's high-water mark) and its seconds."""
    import resource

    import torch

    from qkv.models.decoder import next_token_loss

    B, T, V = LOSS_SHAPE
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=gen)
    fn = plain_loss if kind == "plain" else next_token_loss
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn(logits, labels).backward()
    seconds = time.perf_counter() - start
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"peak_mb": added / 1024, "seconds": seconds}


def loss_costs(threads: int) -> dict[str, dict[str, float]]:
    """`loss_worker` for F.cross_entropy on float32 copies (plain) and qkv's chunked loss, each in
    a fresh process so that one's memory high-water mark does not hide the other's."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = {}
    for kind in ("plain", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--loss-worker", kind], env=env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# -- report ------------------------------------------------------------------------------------
def summarize(rounds: list[list[tuple[float, float]]], warmup: int) -> dict:
    """Median ms/iter of each round's timed iterations -> best round, every round, mean loss."""
    medians = [statistics.median(ms for ms, _ in rows[warmup:]) for rows in rounds]
    losses = [loss for rows in rounds for _, loss in rows[warmup:]]
    return {"ms": min(medians), "rounds": medians, "loss": statistics.mean(losses)}


def table(results: dict[str, dict]) -> str:
    base = results.get("nanogpt", {}).get("ms")
    width = max(10, *map(len, results))
    lines = [f"{'side':{width}} {'ms/iter':>9} {'vs nanoGPT':>11} {'mean loss':>10}  rounds (median ms/iter)"]
    for side, r in results.items():
        ratio = f"{base / r['ms']:.2f}x" if base and side != "nanogpt" else "-"
        rounds = " ".join(f"{ms:.1f}" for ms in r["rounds"])
        lines.append(f"{side:{width}} {r['ms']:9.1f} {ratio:>11} {r['loss']:10.4f}  {rounds}")
        if r.get("compile_s"):
            lines.append(f"{'':{width}} first step (trace + compile + run): {r['compile_s']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=8, help="timed iterations per side and round (default 8)")
    p.add_argument("--warmup", type=int, default=3, help="iterations run before timing (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the sides (default 2)")
    p.add_argument("--threads", type=int, default=None, help="threads of every side (default: physical cores)")
    p.add_argument("--sides", default="nanogpt,fp32,bf16",
                   help=f"comma-separated, of {', '.join(SIDES)}; qkv sides may add +{', +'.join(FLAGS)}")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="add the compiled sides fp32+compile and bf16+compile")
    p.add_argument("--chars", type=int, default=1_000_000, help="characters of the dataset (default 1,000,000)")
    p.add_argument("--interleaved", action="store_true",
                   help="all sides in one process, a step of each in turn, in CPU time (busy machines)")  # fmt: skip
    p.add_argument("--optimizer", action="store_true", help="time one AdamW update, foreach vs fused, and exit")
    p.add_argument("--linear", action="store_true", help="time the fp32 linears' fwd+bwd, MKL vs oneDNN, and exit")
    p.add_argument("--attention", action="store_true", help="time attention fwd+bwd, fused vs block-causal, and exit")
    p.add_argument("--loss", action="store_true", help="peak memory and time of the loss at a 49k vocabulary, and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--loss-worker", choices=("plain", "chunked"), help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loss_worker:
        print(json.dumps(loss_worker(args.loss_worker)))
        return 0
    if args.loss:
        from qkv.threads import physical_cores

        costs = loss_costs(args.threads or physical_cores())
        logits_mb = math.prod(LOSS_SHAPE) * 2 / 2**20
        print(f"loss forward + backward over bf16 logits {list(LOSS_SHAPE)} ({logits_mb:.0f} MB), peak memory added:")
        for kind, c in costs.items():
            name = {"plain": "F.cross_entropy(float32 copy)", "chunked": "next_token_loss (chunked)"}[kind]
            print(f"  {name:30} {c['peak_mb']:7.0f} MB  {c['seconds']:6.2f} s")
        return 0
    if args.worker:
        print(json.dumps(qkv_worker(args.worker, args.data, args.iters, args.threads)))
        return 0
    if args.optimizer:
        from qkv.threads import physical_cores

        times = optimizer_times(args.threads or physical_cores())
        print(f"AdamW update of the benchmark model: foreach {times['foreach']:.2f} ms, fused {times['fused']:.2f} ms "
              f"({times['foreach'] / times['fused']:.1f}x)")  # fmt: skip
        return 0
    if args.linear:
        from qkv.threads import physical_cores

        times = linear_times(args.threads or physical_cores())
        print(f"float32 linear forward + backward over {SHAPE['batch_size'] * SHAPE['block_size']} tokens, best ms:")
        print(f"  {'in -> out':12} {'F.linear (MKL)':>15} {'float32_linear (oneDNN)':>24}")
        for name, (mkl, onednn) in times.items():
            print(f"  {name:12} {mkl:15.2f} {onednn:24.2f}  {mkl / onednn:.2f}x")
        return 0
    if args.attention:
        from qkv.threads import physical_cores

        times = attention_times(args.threads or physical_cores())
        print("causal attention forward + backward, [16, 4, 256, 64], best ms:")
        print("\n".join(f"  {name:36} {ms:7.1f}" for name, ms in times.items()))
        return 0
    sides = [s for s in args.sides.split(",") if s] + (["fp32+compile", "bf16+compile"] if args.compile else [])
    for side in sides:
        base, *flags = side.split("+")
        if base not in SIDES or (flags and base == "nanogpt") or set(flags) - set(FLAGS):
            p.error(f"unknown side {side!r}: choose from {', '.join(SIDES)}, a qkv one with +{', +'.join(FLAGS)}")
        if args.interleaved and set(flags) - {"mkl", "foreach", "compile"}:
            p.error(f"--interleaved mixes only the flags +mkl, +foreach and +compile, not {side!r}")
    if args.iters < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--iters and --repeats must be >= 1 and --warmup >= 0")
    from qkv.threads import physical_cores

    threads = args.threads or physical_cores()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    env.pop("QKV_THREADS", None)
    total = args.warmup + args.iters
    with tempfile.TemporaryDirectory(prefix="qkv-train-bench-") as tmp:
        data_dir = Path(tmp) / "stdlib_char"
        vocab = build_dataset(data_dir, args.chars)
        log(f"data: {args.chars:,} characters of the standard library's sources, vocabulary {vocab}; "
            f"{threads} threads; {args.warmup} + {args.iters} iterations per side, {args.repeats} rounds")  # fmt: skip
        if args.interleaved:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # compiled sides start cold
            import torch

            torch.set_num_threads(threads)
            table_text = interleaved(sides, data_dir, vocab, args.iters, args.warmup)
            print(f"torch {torch.__version__}, {threads} threads, one process, steps interleaved; shape: {SHAPE}")
            print(table_text)
            return 0
        runs: dict[str, list] = {s: [] for s in sides}
        compile_s: dict[str, float] = {}
        for round_ in range(args.repeats):
            for side in sides:
                start = time.perf_counter()
                if side == "nanogpt":
                    rows = run_nanogpt(data_dir, Path(tmp) / "out", total, env)
                else:
                    # A compiled side starts from an empty inductor cache: its first step is a cold start.
                    cache = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / f"inductor-{round_}-{side}")}
                    out = run_qkv(side, data_dir, total, threads, {**env, **cache})
                    rows = [tuple(r) for r in out["rows"]]
                    if out["compile_s"] is not None:
                        compile_s[side] = min(compile_s.get(side, 1e9), out["compile_s"])
                runs[side].append(rows)
                median = statistics.median(ms for ms, _ in rows[args.warmup :])
                log(f"round {round_ + 1}/{args.repeats} {side}: {median:.1f} ms/iter "
                    f"({time.perf_counter() - start:.0f} s in all)")  # fmt: skip
    results = {s: summarize(runs[s], args.warmup) | {"compile_s": compile_s.get(s)} for s in sides}
    import torch

    print(f"torch {torch.__version__}, {threads} threads; shape: {SHAPE}, vocabulary {vocab}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
