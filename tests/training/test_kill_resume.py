"""Kill-safe resume: `qkv train` is SIGKILLed at a random moment (during a step, or while a
checkpoint is being written); `--resume` continues from the last complete checkpoint and logs
bit-identical losses to an uninterrupted run's. The runs use torch's default thread count.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("qkv.tokenizer")

STEPS = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "hex",
        "jumbo",
        "boxes",
    ]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    return path


def command(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qkv.cli.main", "train", "--corpus", str(corpus), "--preset", "tiny-gpt2",
            "--out", str(out), "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300", "--steps", str(STEPS),
            "--save-every", "4", "--eval-every", "0", "--quiet", *extra]  # fmt: skip


def default_threads_env() -> dict[str, str]:
    """The environment without thread-count overrides: torch picks its default."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def records(out: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (the only ones allowed to differ)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


EXTRA = {"native": (), "sharded": ("--sharded-checkpoint",), "2-ranks": ("--nproc", "2")}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """metrics.jsonl records of uninterrupted runs, by checkpoint kind (made when first asked for)."""
    made = {}

    def get(kind):
        extra = EXTRA[kind] if kind == "2-ranks" else ()  # one process trains the same with either checkpoint
        if extra not in made:
            out = tmp_path_factory.mktemp("straight") / "run"
            subprocess.run(command(corpus, out, *extra), check=True, capture_output=True, env=default_threads_env(),
                           timeout=300)  # fmt: skip
            made[extra] = records(out)
        return made[extra]

    return get


def unfinished_saves(out: Path) -> list[str]:
    return [name for name in os.listdir(out) if ".tmp-" in name] if out.is_dir() else []


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc): torchrun starts its workers in sessions of their own."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(child) for child in (task / "children").read_text().split()]
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its descendants at once, as a power cut would."""
    for p in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_during(corpus: Path, out: Path, moment: str, extra: tuple[str, ...]) -> str | None:
    """Start the run and SIGKILL it -> what was seen, or None if the run ended first. "step": in
    the step after a random one past the first checkpoint; "save": as soon as a checkpoint's
    temporary directory appears, after the first checkpoint."""
    proc = subprocess.Popen(command(corpus, out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=default_threads_env())  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        after = random.randint(5, STEPS - 3) if moment == "step" else 0
        while not (out / "checkpoint").is_dir() or steps_logged(out) < after:  # the first checkpoint: step 4
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.001)
        if moment == "step":
            delay = random.uniform(0.0, 0.005)
            time.sleep(delay)
            seen = f"killed {delay * 1000:.1f} ms after step {after} was logged"
        else:
            while not unfinished_saves(out):  # the next save has started
                if proc.poll() is not None:
                    return None
                time.sleep(0.0001)
            seen = f"killed during a save: {unfinished_saves(out)}"
        kill_tree(proc.pid)
        proc.wait(timeout=30)
        return seen if proc.returncode == -signal.SIGKILL else None
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize(
    ("moment", "checkpoint"),
    [
        ("step", "native"),
        ("save", "sharded"),
        pytest.param("save", "native", marks=pytest.mark.slow),
        pytest.param("step", "sharded", marks=pytest.mark.slow),
        pytest.param("save", "2-ranks", marks=pytest.mark.slow),  # `qkv train --nproc 2`: torchrun and its workers
    ],
)
def test_sigkill_then_resume_gives_bit_identical_losses(corpus, tmp_path, uninterrupted, moment, checkpoint):
    extra = EXTRA[checkpoint]
    for attempt in range(3):  # a save takes milliseconds: the poll may miss every one of a run
        out = tmp_path / f"run{attempt}"
        seen = kill_during(corpus, out, moment, extra)
        if seen is not None:
            break
    assert seen is not None, f"3 runs ended before a kill at a {moment} could land"
    left = unfinished_saves(out)
    if moment == "save":
        assert left, seen  # the kill left a half-written save behind ...
    # ... but checkpoint/ is complete (or, killed in the instant between replace_directory's two
    # renames, the previous one waits at .checkpoint.previous, which resume puts back)
    whole = out / "checkpoint" if (out / "checkpoint").is_dir() else out / ".checkpoint.previous"
    assert json.loads((whole / "config.json").read_text())["format"] == "qkv"
    assert (whole / "distributed" / ".metadata").is_file() == (checkpoint != "native")

    done = subprocess.run(command(corpus, out, "--resume", *extra), capture_output=True, text=True,
                          env=default_threads_env(), timeout=300)  # fmt: skip
    assert done.returncode == 0, f"{seen}\n{done.stderr[-3000:]}"
    for name in left:
        assert f"removed {out / name}" in done.stderr
    assert not unfinished_saves(out)
    assert records(out) == uninterrupted(checkpoint), seen  # every step once, the same floats bit for bit
