"""`qkv train`: trains a tokenizer and a model from text files, writes a run directory, resumes."""

import json

import pytest

from qkv.cli.main import main
from qkv.loading import load

pytest.importorskip("qkv.tokenizer")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    return path


def train(corpus, out, *extra):
    return main(["train", "--corpus", str(corpus), "--preset", "tiny-gpt2", "--out", str(out), "--seq-len", "16",
                 "--batch-size", "2", "--vocab-size", "300", "--quiet", *extra])  # fmt: skip


def steps_logged(out):
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_then_resume(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "3") == 0
    assert "eval loss" in capsys.readouterr().out
    model = load(out / "checkpoint")
    assert model.tokenizer is not None and model.config.vocab_size <= 300
    assert (out / "loss_curve.png").is_file() and steps_logged(out) == [1, 2, 3]
    assert train(corpus, out, "--steps", "3") == 2  # a fresh run never overwrites one
    assert "already holds a run" in capsys.readouterr().err

    assert train(corpus, out, "--steps", "5", "--resume") == 0
    assert steps_logged(out) == [1, 2, 3, 4, 5]


def test_bad_arguments_exit_2(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train(corpus, tmp_path / "run", "--steps", "0")
    assert exc.value.code == 2
    assert train(tmp_path / "missing.txt", tmp_path / "run", "--steps", "1") == 2
    assert "missing.txt" in capsys.readouterr().err
    assert train(corpus, tmp_path / "run", "--steps", "1", "--preset", "tiny-nope") == 2
