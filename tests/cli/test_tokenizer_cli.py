"""`qkv tokenizer train|encode|decode|info`: thin commands over qkv.tokenizer."""

from __future__ import annotations

import io
import json
import sysconfig
from pathlib import Path

import pytest

from qkv.cli import tokenizer as tokenizer_cli
from qkv.cli.main import main
from qkv.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    corpus = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:5]
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "400", *map(str, corpus),
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    return out


def test_train_writes_a_loadable_tokenizer(trained_dir, capsys):
    tok = load_tokenizer(trained_dir)
    assert tok.vocab_size == 400 and tok.kind == "bpe"
    assert sorted(p.name for p in trained_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_train_wordpiece(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello there world, hello again.\n" * 50)
    out = tmp_path / "wp"
    assert main(["tokenizer", "train", "--kind", "wordpiece", "--vocab-size", "80", str(corpus), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert "wordpiece tokenizer" in capsys.readouterr().out
    assert load_tokenizer(out).special_tokens["cls_token"] == "[CLS]"


def test_encode_json_and_decode(trained_dir, capsys):
    assert main(["tokenizer", "encode", str(trained_dir), "def f(x): return x", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(trained_dir)
    assert result["ids"] == tok.encode("def f(x): return x")
    assert len(result["tokens"]) == len(result["offsets"]) == len(result["ids"])
    assert main(["tokenizer", "decode", str(trained_dir), *map(str, result["ids"])]) == 0
    assert capsys.readouterr().out == "def f(x): return x\n"


def test_encode_lists_ids_and_tokens(trained_dir, capsys):
    assert main(["tokenizer", "encode", str(trained_dir), "import os"]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(trained_dir)
    for token_id in tok.encode("import os"):
        assert f"{token_id:>8}  {tok.id_to_token(token_id)!r}" in out
    assert "\x1b[" not in out  # no colour when stdout is not a terminal


def test_encode_reads_stdin_and_honours_allowed_special(trained_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a<|endoftext|>b"))
    assert main(["tokenizer", "encode", str(trained_dir), "-", "--json", "--allowed-special", "none"]) == 0
    ids = json.loads(capsys.readouterr().out)["ids"]
    assert load_tokenizer(trained_dir).token_to_id("<|endoftext|>") not in ids


def test_coloured_boundaries():
    text = "ab cd"
    coloured = tokenizer_cli._coloured(text, [(0, 0), (0, 2), (2, 5), (0, 0)])
    assert coloured.count("\x1b[0m") == 2
    assert coloured.replace("\x1b[0m", "").split("\x1b[") [1:] == ["48;5;24mab", "48;5;58m cd"]  # fmt: skip


def test_info(trained_dir, capsys):
    assert main(["tokenizer", "info", str(trained_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "bpe" and info["vocab_size"] == 400 and info["chat_template"] is False
    assert info["special_tokens"]["eos_token"] == ["<|endoftext|>", 0]
    assert main(["tokenizer", "info", str(trained_dir)]) == 0
    assert "vocab size:      400" in capsys.readouterr().out


@pytest.mark.real
def test_known_name(capsys):
    assert main(["tokenizer", "info", "all-minilm-l6-v2"]) == 0
    assert "wordpiece" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tokenizer", "decode", "{dir}", "999999"], "token id 999999 is out of range for a vocabulary of size 400"),
        (["tokenizer", "info", "{dir}/nothing"], "neither an existing path nor a known model name"),
        (["tokenizer", "train", "/no/such/file.txt", "--vocab-size", "300", "--out", "{dir}/x"], "does not exist"),
        (["tokenizer", "encode", "{dir}", "x", "--allowed-special", "<nope>"], "not special tokens"),
    ],
)
def test_errors_exit_2_with_one_line(argv, message, trained_dir, capsys):
    assert main([a.format(dir=trained_dir) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
