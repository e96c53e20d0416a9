"""`qkv bench MODEL`: a table (or JSON) of every measurement on a tiny checkpoint; the peer's
preconditions (a GGUF model, an interpreter with llama_cpp) fail fast with exit 2 and a message."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from cli_run import qkv
from qkv.bench import METRICS
from tiny_checkpoint import save_tiny_checkpoint

CORPUS = ["The quick brown fox jumps over the lazy dog."] * 20
FAST = ("--repeats", 1, "--new-tokens", 4)
ROWS = ["decode b1", "prefill 512", "batch 16", "load", "peak RSS", "first start", "second start"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", CORPUS, 1024)


def test_table_has_every_row_with_a_positive_number(checkpoint, capsys):
    code, out, err = qkv(capsys, "bench", checkpoint, *FAST)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["unit", "qkv"]
    for label, line in zip(ROWS, lines[1:], strict=True):
        assert line.startswith(label)
        assert float(line.split()[-1]) > 0
    assert "qkv bench: qkv: decode b1, 4 tokens, best of 1" in err  # progress goes to stderr


def test_json_has_every_metric(checkpoint, capsys):
    code, out, _ = qkv(capsys, "bench", checkpoint, *FAST, "--threads", 1, "--json")
    result = json.loads(out)
    assert code == 0 and set(result["qkv"]) == {key for key, _ in METRICS}
    assert all(v > 0 for v in result["qkv"].values())
    assert result["config"]["threads"] == 1 and result["config"]["batch_new_tokens"] == 2
    assert result["peer"] is None and result["ratios"] == {}


def test_against_llama_cpp_needs_a_gguf_model(checkpoint, capsys):
    code, out, err = qkv(capsys, "bench", checkpoint, "--against", "llama.cpp")
    assert (code, out) == (2, "")
    assert err.startswith("qkv bench: error: --against llama.cpp needs a GGUF model") and str(checkpoint) in err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="this interpreter has llama_cpp")
def test_a_peer_python_without_llama_cpp_exits_2_naming_the_flag(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))  # checked before anything is loaded
    code, _, err = qkv(capsys, "bench", gguf, "--against", "llama.cpp", "--peer-python", sys.executable)
    assert code == 2 and f"--peer-python {sys.executable} cannot import llama_cpp" in err
    assert 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python' in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(("--peer-python", "python"), "--peer-python applies to --against llama.cpp"),
     (("--no-extra-bufts",), "--no-extra-bufts applies to --against llama.cpp"),
     (("--new-tokens", 1), "new_tokens=1 must be >= 2")],
)  # fmt: skip
def test_options_that_would_do_nothing_are_refused(checkpoint, capsys, argv, message):
    code, _, err = qkv(capsys, "bench", checkpoint, *argv)
    assert code == 2 and message in err
