"""`qkv finetune` and `qkv classify`: pre-train, fine-tune, save, load and predict from the command
line; bad input exits 2 with a message that names the problem."""

import json

import pytest

from qkv.cli.main import main

pytest.importorskip("qkv.tokenizer")

GREETINGS = ["hello there friend", "good morning to you", "hi how are you", "hello and welcome"]
FAREWELLS = ["goodbye my friend", "see you later", "bye for now", "farewell and good night"]


@pytest.fixture
def encoder(tmp_path):
    """A tiny encoder pre-trained for two steps with `qkv train --objective mlm`."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(GREETINGS + FAREWELLS) * 40)
    out = tmp_path / "mlm"
    code = main(["train", "--objective", "mlm", "--corpus", str(corpus), "--preset", "tiny-bert", "--steps", "2",
                 "--seq-len", "16", "--batch-size", "4", "--vocab-size", "200", "--out", str(out),
                 "--quiet"])  # fmt: skip
    assert code == 0
    return out / "checkpoint"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("".join(f"greeting\t{t}\n" for t in GREETINGS) + "".join(f"farewell\t{t}\n" for t in FAREWELLS))
    return path


def finetune(model, data, out, *extra):
    return main(["finetune", "--task", "classification", "--model", str(model), "--data", str(data),
                 "--out", str(out), "--steps", "3", "--batch-size", "4", "--val-fraction", "0.25", "--quiet",
                 *extra])  # fmt: skip


def test_finetune_then_classify(encoder, data, tmp_path, capsys):
    assert finetune(encoder, data, tmp_path / "ft", "--lr", "1e-3") == 0
    out = capsys.readouterr().out
    assert "labels: farewell, greeting" in out and "accuracy" in out
    checkpoint = tmp_path / "ft" / "checkpoint"
    assert json.loads((checkpoint / "config.json").read_text())["config"]["extra"]["labels"] == ["farewell", "greeting"]

    assert main(["classify", str(checkpoint), "hello friend", "bye for now"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line in lines:
        label, probability = line.split("\t")
        assert label in ("farewell", "greeting") and 0.5 <= float(probability) <= 1.0

    assert main(["classify", str(checkpoint), "hello friend", "--json", "--top-k", "2"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["text"] == "hello friend" and record["top"][0]["label"] == record["label"]
    assert sum(t["probability"] for t in record["top"]) == pytest.approx(1.0, abs=1e-5)


def test_bad_input_exits_2(encoder, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--task", "regression", "--model", str(encoder), "--data", str(data)])
    assert exc.value.code == 2
    assert "invalid choice: 'regression'" in capsys.readouterr().err

    assert finetune(encoder, data, tmp_path / "ft") == 0
    three = tmp_path / "three.tsv"
    three.write_text(data.read_text() + "question\twhat time is it\n")
    assert finetune(tmp_path / "ft" / "checkpoint", three, tmp_path / "again") == 2  # the head has 2 labels
    assert "label(s) 'question'" in capsys.readouterr().err

    bad = tmp_path / "bad.tsv"
    bad.write_text("greeting\thello\nno tab on this line\n")
    assert finetune(encoder, bad, tmp_path / "bad") == 2
    assert "bad.tsv:2: no tab" in capsys.readouterr().err
    assert finetune(encoder, tmp_path / "missing.tsv", tmp_path / "missing") == 2
    assert main(["classify", str(encoder), "hello"]) == 2  # an MLM, not a classifier
    assert "no classification head" in capsys.readouterr().err
