"""Embedding files: one text per line in; .npy and .jsonl out, read back exactly and written
atomically (a failed write leaves the previous file)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from qkv.embedding.files import check_output_path, json_lines, read_lines, save_embeddings
from qkv.errors import UsageError

TEXTS = ["first", "", 'ünïcödé "quoted" 👍']


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) / 7


def test_npy_round_trip(tmp_path, vectors):
    path = save_embeddings(tmp_path / "out" / "v.npy", vectors)
    loaded = np.load(path)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, vectors.numpy())
    assert [p.name for p in path.parent.iterdir()] == ["v.npy"]  # no temporary left behind


def test_jsonl_round_trip_at_float32_precision(tmp_path, vectors):
    path = save_embeddings(tmp_path / "v.JSONL", vectors, TEXTS)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [row["text"] for row in rows] == TEXTS
    np.testing.assert_array_equal(np.array([row["embedding"] for row in rows], dtype=np.float32), vectors.numpy())
    assert list(json_lines(TEXTS, vectors)) == path.read_text(encoding="utf-8").splitlines()


def test_bad_output_names(tmp_path, vectors):
    with pytest.raises(UsageError, match=r"use a name ending in \.npy or \.jsonl"):
        check_output_path(tmp_path / "v.csv")
    with pytest.raises(UsageError, match="pass texts"):
        save_embeddings(tmp_path / "v.jsonl", vectors)


def test_a_failed_write_keeps_the_previous_file(tmp_path, vectors):
    path = save_embeddings(tmp_path / "v.jsonl", vectors, TEXTS)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        save_embeddings(path, vectors, TEXTS[:2])  # one text short
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.jsonl"]


def test_read_lines_keeps_every_line(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffone\n\ntwo\r\nthree".encode())
    assert read_lines(path) == ["one", "", "two", "three"]
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\n"))
    assert read_lines("-") == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read .*No such file"), (b"", "is empty"), (b"caf\xe9", "is not UTF-8 text")],
)
def test_read_lines_bad_files(tmp_path, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        read_lines(path)
