"""`qkv` exit codes: 2 and one line naming the file for bad input, 1 for a failing machine, and a
traceback for a bug in qkv (a plain ValueError is one)."""

from __future__ import annotations

import errno
import json
import os

import pytest

import qkv.checkpoints.native
import qkv.tokenizer
from qkv.cli.main import main
from qkv.errors import TokenizerError


@pytest.fixture
def tokenizer_dir(tmp_path):
    tok = qkv.tokenizer.train_tokenizer(kind="bpe", texts=["hello world"] * 4, vocab_size=260, show_progress=False)
    tok.save(tmp_path / "tok")
    return tmp_path / "tok"


def fail_with(monkeypatch, exc: BaseException) -> None:
    """Make `qkv tokenizer info` fail with `exc` where it loads the tokenizer."""

    def load(source):
        raise exc

    monkeypatch.setattr(qkv.tokenizer, "load_tokenizer", load)


def error_line(err: str) -> str:
    """The one line of stderr that reports the error (progress lines may come before it)."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n"), err
    return lines[0]


def test_a_hostile_file_is_one_line_naming_it_and_exit_2(tokenizer_dir, capsys):
    (tokenizer_dir / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["tokenizer", "info", str(tokenizer_dir)]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("qkv tokenizer: error: tokenizer config ") and str(tokenizer_dir) in err
    assert "nests JSON arrays or objects too deeply" in err


def test_a_model_whose_config_does_not_fit_its_weights_exits_2(tmp_path, capsys):
    model = qkv.DecoderLM(qkv.ModelConfig.from_name("tiny-llama", vocab_size=64, d_model=32, n_layers=1))
    path = qkv.checkpoints.native.save_native(model, tmp_path / "ckpt")
    data = json.loads((path / "config.json").read_text())
    data["config"]["n_layers"] = 10**9
    (path / "config.json").write_text(json.dumps(data))
    assert main(["convert", str(path), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "asks for 1000000000 layers but the file holds tensors for 1" in err and str(path) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "exc, code, message",
    [
        (TokenizerError("tok.json: bad\n  second line"), 2, "tok.json: bad second line"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/tok.json"), 2, "Permission denied: /data/tok.json"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"), 2, "No such file or directory: /x"),
        (RecursionError("maximum recursion depth exceeded"), 2, "the input is nested too deeply"),
        (OSError(errno.ENOSPC, "No space left on device", "/full/out"), 1, "No space left on device: /full/out"),
        (OSError(errno.EIO, "Input/output error"), 1, "Input/output error"),
        (MemoryError(), 1, "out of memory"),
    ],
    ids=["qkv-error", "permission", "missing", "recursion", "disk-full", "io-error", "memory"],
)
def test_exit_codes(monkeypatch, capsys, exc, code, message):
    fail_with(monkeypatch, exc)
    assert main(["tokenizer", "info", "anything"]) == code
    assert error_line(capsys.readouterr().err).startswith(f"qkv tokenizer: error: {message}")


@pytest.mark.parametrize("exc", [ValueError("a bug in qkv"), KeyError("also a bug"), TypeError("and this")])
def test_a_bug_keeps_its_traceback(monkeypatch, exc):
    fail_with(monkeypatch, exc)
    with pytest.raises(type(exc)):
        main(["tokenizer", "info", "anything"])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_exits_2(tokenizer_dir, capsys):
    (tokenizer_dir / "tokenizer.json").chmod(0)
    assert main(["tokenizer", "info", str(tokenizer_dir)]) == 2
    assert "Permission denied" in error_line(capsys.readouterr().err)
