"""`qkv.bench`: each measurement's worker on a tiny checkpoint (qkv and transformers), the table and
its ratios, the GGUF and peer-interpreter checks, and the llama.cpp runner's argument errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qkv.bench import METRICS, RUNNER, BenchConfig, BenchResult, _worker, bench_ids, check_peer_python, gguf_file
from qkv.errors import UsageError
from tiny_checkpoint import save_tiny_checkpoint

CORPUS = ["The quick brown fox jumps over the lazy dog."] * 20
PEER_PYTHON = Path("/work/peer-venv/bin/python")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny native checkpoint whose context holds a 512-token prefill."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", CORPUS, 1024)


@pytest.fixture
def worker_env(monkeypatch):
    """The worker sets QKV_THREADS for its process; in this one, monkeypatch puts it back."""
    monkeypatch.setenv("QKV_THREADS", "1")


def job(source: Path, kind: str, backend: str = "qkv", **extra) -> dict:
    prompt, prefill = bench_ids(source, 32)
    return {"source": str(source), "backend": backend, "prompt": prompt, "prefill": prefill, "threads": 1,
            "dtype": None, "repeats": 1, "kind": kind, "new_tokens": 4, "batch_size": 2, **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "keys"),
    [("decode", {"decode_tok_s", "peak_rss_mb"}), ("prefill", {"prefill_tok_s"}), ("batch", {"batch_tok_s"}),
     ("start", {"at"})],
)  # fmt: skip
def test_worker_measures_each_kind(checkpoint, kind, keys, worker_env):
    out = _worker(job(checkpoint, kind))
    assert set(out) == keys | {"load_s"}
    assert all(v > 0 for v in out.values())


def test_worker_measures_transformers_on_the_exported_weights(checkpoint, tmp_path, worker_env):
    from qkv.checkpoints.hf import export_hf
    from qkv.loading import load

    export_hf(load(checkpoint), tmp_path / "hf")
    prompt_job = job(checkpoint, "prefill", backend="transformers") | {"source": str(tmp_path / "hf")}
    out = _worker(prompt_job)
    assert out["prefill_tok_s"] > 0 and out["load_s"] > 0


def test_bench_ids_are_a_chat_prompt_and_a_prefill_of_the_length_asked(checkpoint):
    prompt, prefill = bench_ids(checkpoint, 512)
    assert len(prompt) > 5 and len(prefill) == 512 and len(set(prefill)) > 10


def test_table_has_every_row_and_ratios_against_the_peer():
    config = BenchConfig(prefill_tokens=512, batch_size=16)
    qkv = {key: float(i + 1) for i, (key, _) in enumerate(METRICS)}
    peer = dict.fromkeys(qkv) | {"decode_tok_s": 0.5, "load_s": 2.0}
    result = BenchResult(config, qkv, peer, {"name": "llama.cpp"})
    assert result.ratios()["decode_tok_s"] == 2.0 and result.ratios()["load_s"] == 2.0
    assert result.ratios()["batch_tok_s"] is None
    lines = result.table().splitlines()
    labels = ["decode b1", "prefill 512", "batch 16", "load", "peak RSS", "first start", "second start"]
    assert [line[:14].strip() for line in lines[1:8]] == labels
    assert lines[1].split()[-1] == "2.00x" and lines[3].split()[-1] == "-"
    assert json.loads(json.dumps(result.to_dict()))["ratios"]["load_s"] == 2.0


def test_bad_config_is_refused():
    with pytest.raises(UsageError, match="new_tokens=1 must be >= 2"):
        BenchConfig(new_tokens=1)


def test_gguf_file_refuses_what_is_not_gguf(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="needs a GGUF model"):
        gguf_file(checkpoint)
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + bytes(16))
    assert gguf_file(fake) == fake and gguf_file(tmp_path) == fake


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="this interpreter has llama_cpp")
def test_a_peer_python_without_llama_cpp_is_refused_naming_the_flag():
    with pytest.raises(UsageError, match="--peer-python .* cannot import llama_cpp.*pip install llama-cpp-python"):
        check_peer_python(sys.executable)


def runner(*argv, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(RUNNER), *map(str, argv)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv",
    [("speed",), ("speed", "--model", "m.gguf", "--ids-file", "x.json"), ("bogus", "--model", "m", "--threads", "1",
     "--ids-file", "x"), ("speed", "--model", "m", "--threads", "0", "--ids-file", "x")],
)  # fmt: skip
def test_runner_argument_errors_exit_2(argv):
    proc = runner(*argv)
    assert proc.returncode == 2 and "error:" in proc.stderr and proc.stdout == ""


def test_runner_bad_ids_file_or_missing_llama_cpp_exit_2_with_one_line(tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"prompt": [1, 2]}))
    proc = runner("speed", "--model", tmp_path / "m.gguf", "--threads", 1, "--ids-file", ids)
    assert proc.returncode == 2 and "lacks prefill, new_tokens, repeats" in proc.stderr
    ids.write_text(json.dumps({"ids": [1, 2, 3], "window": 2}))
    proc = runner("ppl", "--model", tmp_path / "m.gguf", "--threads", 1, "--ids-file", ids)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    if importlib.util.find_spec("llama_cpp") is None:
        assert "pip install llama-cpp-python" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not PEER_PYTHON.exists(), reason=f"no llama-cpp-python interpreter at {PEER_PYTHON}")
def test_runner_speed_and_ppl_with_llama_cpp(tmp_path):
    from qkv.hub import pull

    model = gguf_file(pull("smollm2-135m-instruct"))
    prompt, prefill = bench_ids("smollm2-135m-instruct", 64)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"prompt": prompt, "prefill": prefill, "new_tokens": 8, "repeats": 1}))
    proc = runner("speed", "--model", model, "--threads", 1, "--ids-file", ids, python=str(PEER_PYTHON))
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["decode_tok_s"] > 0 and out["prefill_tok_s"] > 0 and out["extra_bufts"]
    ids.write_text(json.dumps({"ids": prefill + prefill[:5], "window": 32}))
    proc = runner("ppl", "--model", model, "--threads", 1, "--ids-file", ids, python=str(PEER_PYTHON))
    out = json.loads(proc.stdout)
    assert out["count"] == 31 + 31 + 4 and 1 < out["ppl"] < 1000
