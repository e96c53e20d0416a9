"""`qkv train --objective mlm|rtd`: encoder pre-training from the command line."""

import pytest

import qkv
from qkv.cli.main import main

pytest.importorskip("qkv.tokenizer")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path


def train(corpus, out, *extra):
    return main(["train", "--corpus", str(corpus), "--preset", "tiny-bert", "--out", str(out), "--seq-len", "16",
                 "--batch-size", "4", "--vocab-size", "200", "--steps", "2", "--quiet", *extra])  # fmt: skip


@pytest.mark.parametrize("objective", ["mlm", "rtd"])
def test_encoder_objectives(corpus, tmp_path, capsys, objective):
    assert train(corpus, tmp_path / "run", "--objective", objective, "--whole-word") == 0
    assert "accuracy" in capsys.readouterr().out
    model = qkv.load(tmp_path / "run" / "checkpoint")
    assert model.config.family == "encoder" and model.config.head == objective


def test_bad_objective(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train(corpus, tmp_path / "run", "--objective", "bogus")
    assert exc.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert train(corpus, tmp_path / "run", "--objective", "mlm", "--preset", "tiny-gpt2") == 2
    assert "trains family 'encoder'" in capsys.readouterr().err
