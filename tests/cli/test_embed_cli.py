"""`qkv embed | similarity | search`: thin commands over qkv.embedding, checked against
sentence-transformers on all-MiniLM-L6-v2 (marked `real`); bad input is one line and exit 2."""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv import hub
from qkv.cli.main import main
from qkv.embedding.search import cosine_matrix
from sentence_reference import MAX_ABS_DIFF, assert_same_embeddings, load_reference, reference_embed
from tiny_checkpoint import save_tiny_checkpoint

MODEL = "all-minilm-l6-v2"
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "", "The sky is blue today. 🌤"]


@pytest.fixture(scope="module")
def reference():
    return load_reference(hub.pull(MODEL, quiet=True))


@pytest.fixture
def notes(tmp_path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "travel.md").write_text("Paris is the capital of France.\nThe train leaves at nine.\n")
    (tmp_path / "sub" / "health.txt").write_text("Dentist appointment on Tuesday.\n\nBuy toothpaste.\n")
    (tmp_path / "sub" / "image.txt").write_bytes(b"\x00\x01\x02 not text")
    return tmp_path


def run_error(argv: list[str], capsys) -> str:
    """Run a command expected to fail on its input: exit 2, one line on stderr; that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


@pytest.mark.real
def test_embed_prints_json_lines(reference, capsys):
    assert main(["embed", MODEL, *TEXTS]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["text"] for row in rows] == TEXTS
    assert_same_embeddings(torch.tensor([row["embedding"] for row in rows]), reference_embed(reference, TEXTS))


@pytest.mark.real
@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_embed_file_to_out(reference, tmp_path, capsys, suffix):
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / f"vectors{suffix}"
    assert main(["embed", MODEL, "--file", str(source), "--out", str(out), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"4 embeddings of size 384 written to {out}" in captured.err
    if suffix == ".npy":
        ours = torch.from_numpy(np.load(out))
    else:
        ours = torch.tensor([json.loads(line)["embedding"] for line in out.read_text(encoding="utf-8").splitlines()])
    assert_same_embeddings(ours, reference_embed(reference, TEXTS))


@pytest.mark.real
def test_embed_overrides(reference, capsys):
    assert main(["embed", MODEL, "some text", "--no-normalize", "--pooling", "cls", "--max-length", "8"]) == 0
    norm = torch.tensor(json.loads(capsys.readouterr().out)["embedding"]).norm()
    assert abs(float(norm) - 1) > 0.01  # not normalised


@pytest.mark.real
def test_similarity_table_and_json(reference, capsys):
    texts = TEXTS[:2] + TEXTS[3:]
    assert main(["similarity", MODEL, *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(texts)
    assert lines[0].split() == ["[1]", "[2]", "[3]"]
    assert lines[1].startswith("[1] A man is eating food.")
    expected = cosine_matrix(reference_embed(reference, texts))
    for i, line in enumerate(lines[1:]):
        values = [float(v) for v in line.split()[-len(texts) :]]
        assert values == pytest.approx(expected[i].tolist(), abs=1e-3)  # printed to three decimals
    assert main(["similarity", MODEL, *texts, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["texts"] == texts
    torch.testing.assert_close(torch.tensor(result["matrix"]), expected, atol=MAX_ABS_DIFF, rtol=0)


@pytest.mark.real
def test_search_lines(notes, capsys):
    assert main(["search", MODEL, "--corpus", str(notes), "capital city of France", "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "query: capital city of France"
    assert len(lines) == 3 and lines[1].endswith(f"{notes / 'travel.md'}:1  Paris is the capital of France.")
    assert "skipped 1 file(s)" in captured.err and "image.txt (binary)" in captured.err
    assert "embedding 4 lines from 2 files" in captured.err


@pytest.mark.real
def test_search_files_json_and_ext(notes, capsys):
    argv = ["search", MODEL, "--corpus", str(notes), "--files", "--json", "--quiet"]
    assert main([*argv, "teeth", "travel"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in results] == ["teeth", "travel"]
    assert results[0]["results"][0]["path"] == str(notes / "sub" / "health.txt")
    assert results[0]["results"][0]["line"] is None
    assert results[1]["results"][0]["path"] == str(notes / "travel.md")
    assert main([*argv, "--ext", "md", "teeth"]) == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)["results"]] == [str(notes / "travel.md")]


def test_a_decoder_is_refused_by_every_command(tmp_path, notes, capsys):
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:2]
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", [p.read_text(encoding="utf-8") for p in sources], 64)
    for argv in (["embed", str(checkpoint), "x"], ["similarity", str(checkpoint), "a", "b"],
                 ["search", str(checkpoint), "--corpus", str(notes), "x"]):  # fmt: skip
        assert "needs an encoder model" in run_error(argv, capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed", MODEL], "no texts: give them as arguments or with --file"),
        (["embed", MODEL, "a", "--file", "t.txt"], "not both"),
        (["embed", MODEL, "--file", "{tmp}/data.bin", "--out", "{tmp}/v.csv"], r"\.npy or \.jsonl"),
        (["embed", MODEL, "--file", "{tmp}/missing.txt"], "cannot read {tmp}/missing.txt: No such file"),
        (["embed", MODEL, "--file", "{tmp}/latin1.txt"], "is not UTF-8 text"),
        (["embed", MODEL, "a", "--out", "{tmp}/v.csv"], r"use a name ending in \.npy or \.jsonl"),
        (["embed", "no-such-model", "a"], "neither an existing path nor a known model name"),
        (["similarity", MODEL, "alone"], "at least two texts"),
        (["search", MODEL, "--corpus", "{tmp}/missing", "q"], "corpus folder {tmp}/missing does not exist"),
        (["search", MODEL, "--corpus", "{tmp}", "q"], "no text found under {tmp} .*skipped {tmp}/latin1.txt"),
        (["search", MODEL, "--corpus", "{tmp}", "--ext", ",", "q"], "--ext needs a file ending"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    err = run_error(argv, capsys)
    assert err.startswith(f"qkv {argv[0]}: error: ")
    assert re.search(message.replace("{tmp}", re.escape(str(tmp_path))), err), err


def test_argument_errors_exit_2(capsys):
    for argv in (["search", MODEL, "q"], ["search", MODEL, "--corpus", ".", "q", "--top-k", "0"],
                 ["embed", MODEL, "a", "--pooling", "sum"], ["embed", MODEL, "a", "--batch-size", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    capsys.readouterr()
