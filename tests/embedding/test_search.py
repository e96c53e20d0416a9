"""Semantic search: reading a folder of notes (lines or files, type filter, binary and non-UTF-8
files skipped), cosine ranking against torch's own cosine, and search over real embeddings
ranked as sentence-transformers' embeddings rank them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qkv.embedding.search import Corpus, Passage, cosine_matrix, rank, read_corpus, search
from qkv.errors import UsageError
from sentence_reference import reference_embed

NOTES = {
    "travel.md": "# Travel\n\nParis is the capital of France.\n\nThe train to Lyon leaves at nine.\n---\n",
    "health/dentist.txt": "Dentist appointment on Tuesday at 3 pm.\nBuy toothpaste.\n",
    "cooking/recipes.rst": "Pancakes need flour, eggs and milk.\n```\nBake the bread for forty minutes.\n",
    "code/script.py": "print('hello')\n",
    ".hidden/secret.md": "never read\n",
    ".notes.md": "never read either\n",
    "picture.md": b"\x89PNG\r\n\x1a\n\x00\x00binary",
    "latin1.txt": "caf\xe9 au lait".encode("latin-1"),
}


@pytest.fixture
def notes(tmp_path) -> Path:
    for name, content in NOTES.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return tmp_path


def test_lines_of_text_files(notes):
    corpus = read_corpus(notes)
    assert [(p.path.relative_to(notes).as_posix(), p.line, p.text) for p in corpus.passages] == [
        ("cooking/recipes.rst", 1, "Pancakes need flour, eggs and milk."),
        ("cooking/recipes.rst", 3, "Bake the bread for forty minutes."),
        ("health/dentist.txt", 1, "Dentist appointment on Tuesday at 3 pm."),
        ("health/dentist.txt", 2, "Buy toothpaste."),
        ("travel.md", 1, "# Travel"),
        ("travel.md", 3, "Paris is the capital of France."),
        ("travel.md", 5, "The train to Lyon leaves at nine."),
    ]
    assert sorted((p.relative_to(notes).as_posix(), why) for p, why in corpus.skipped) == [
        ("latin1.txt", "not UTF-8"),
        ("picture.md", "binary"),
    ]
    assert corpus.passages[-1].where == f"{notes / 'travel.md'}:5"


def test_whole_files_and_type_filter(notes):
    corpus = read_corpus(notes, by="file", suffixes=["py", ".TXT"])
    assert [(p.path.name, p.line, p.text) for p in corpus.passages] == [
        ("script.py", None, "print('hello')"),
        ("dentist.txt", None, NOTES["health/dentist.txt"].strip()),
    ]
    assert [p.name for p, _ in corpus.skipped] == ["latin1.txt"]
    everything = read_corpus(notes, suffixes=None)
    assert {p.path.name for p in everything.passages} == {"recipes.rst", "dentist.txt", "travel.md", "script.py"}


@pytest.mark.parametrize(("folder", "message"), [("missing", "does not exist"), ("travel.md", "is not a directory")])
def test_bad_folder(notes, folder, message):
    with pytest.raises(UsageError, match=message):
        read_corpus(notes / folder)
    with pytest.raises(UsageError, match="choose 'line' or 'file'"):
        read_corpus(notes, by="paragraph")


def test_cosine_and_rank_agree_with_torch():
    gen = torch.Generator().manual_seed(0)
    queries, passages = torch.randn(3, 16, generator=gen), torch.randn(10, 16, generator=gen)
    expected = F.cosine_similarity(queries[:, None], passages[None], dim=-1)
    torch.testing.assert_close(cosine_matrix(queries, passages), expected)
    torch.testing.assert_close(cosine_matrix(queries).diagonal(), torch.ones(3))
    scores, indices = rank(queries, passages, top_k=4)
    torch.testing.assert_close(indices, expected.argsort(dim=1, descending=True)[:, :4])
    torch.testing.assert_close(scores, expected.sort(dim=1, descending=True).values[:, :4])
    assert rank(queries, passages, top_k=50)[0].shape == (3, 10)
    with pytest.raises(UsageError, match="top_k=0"):
        rank(queries, passages, top_k=0)


def test_empty_corpus_is_an_error(tiny_encoder):
    with pytest.raises(UsageError, match="no text to search"):
        search(tiny_encoder, None, ["query"], Corpus())


@pytest.mark.real
def test_search_ranks_as_the_reference_embeddings_do(minilm, st_model, notes):
    corpus = read_corpus(notes)
    queries = ["What is the capital of France?", "when do I see the dentist", "ingredients for pancakes"]
    results = search(minilm, None, queries, corpus, top_k=3)
    theirs = cosine_matrix(reference_embed(st_model, queries), reference_embed(st_model, corpus.texts))
    for row, hits in zip(theirs, results):
        assert [passage for _, passage in hits] == [corpus.passages[i] for i in row.argsort(descending=True)[:3]]
        torch.testing.assert_close(torch.tensor([s for s, _ in hits]), row.sort(descending=True).values[:3])
    assert [hits[0][1].text for hits in results] == [
        "Paris is the capital of France.",
        "Dentist appointment on Tuesday at 3 pm.",
        "Pancakes need flour, eggs and milk.",
    ]
    assert isinstance(results[0][0][1], Passage)
