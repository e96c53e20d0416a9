"""`qkv train --objective span|denoise|seq2seq`: encoder-decoder pre-training and supervised training
from the command line, and `qkv generate` on what they save."""

from __future__ import annotations

import json

import pytest

import qkv
from qkv.cli.main import main

TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Look before you leap!\n" * 60


@pytest.mark.parametrize(("objective", "preset"), [("span", "tiny-t5"), ("denoise", "tiny-bart")])
def test_noise_objectives_train_and_generate(objective, preset, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / objective
    argv = ["train", "--objective", objective, "--preset", preset, "--corpus", str(corpus), "--steps", "40",
            "--seq-len", "32", "--batch-size", "8", "--vocab-size", "400", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns something
    model = qkv.load(out / "checkpoint")
    assert type(model) is qkv.EncoderDecoder and model.tokenizer.token_to_id("<extra_id_0>") is not None
    capsys.readouterr()
    assert main(["generate", str(out / "checkpoint"), "--prompt", "The quick brown", "-n", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] >= 1


def test_supervised_pairs_file(tmp_path, capsys):
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    lines = [f"{a} {b}\t{b} {a}" for a in words for b in words if a != b]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("\n".join(lines * 3) + "\n", encoding="utf-8")
    out = tmp_path / "swap"
    argv = ["train", "--objective", "seq2seq", "--preset", "tiny-bart", "--corpus", str(pairs), "--steps", "60",
            "--seq-len", "16", "--batch-size", "16", "--vocab-size", "400", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < losses[0] / 2


def test_bad_input(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    assert main(["train", "--objective", "span", "--preset", "tiny-gpt2", "--corpus", str(corpus), "--steps", "2",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "seq2seq" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n", encoding="utf-8")
    assert main(["train", "--objective", "seq2seq", "--preset", "tiny-bart", "--corpus", str(bad), "--steps", "2",
                 "--vocab-size", "400", "--out", str(tmp_path / "y"), "--quiet"]) == 2  # fmt: skip
    assert "expected one tab" in capsys.readouterr().err
