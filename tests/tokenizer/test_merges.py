"""Merges rebuilt from a vocabulary: their order, and the bounds that keep hostile vocabularies cheap."""

from __future__ import annotations

import pytest

from qkv.errors import TokenizerError
from qkv.tokenizer.merges import CUTS_PER_TOKEN, MAX_TOKEN_LENGTH, MERGES_PER_TOKEN, merges_from_vocab


def test_every_cut_into_two_tokens_ordered_by_the_joined_token_then_the_parts():
    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4, "abbb": 5}
    expected = [("a", "b"), ("a", "bb"), ("ab", "b"), ("b", "b"), ("ab", "bb"), ("abb", "b")]
    assert merges_from_vocab(vocab, "v") == expected
    # An order on the joined token's id (e.g. by SentencePiece score): "abb" first here.
    first = merges_from_vocab(vocab, "v", order=lambda i: (i != 3, i))
    assert first[:2] == [("a", "bb"), ("ab", "b")]


def test_bytes_tokens():
    assert merges_from_vocab({b"a": 0, b"b": 1, b"ab": 2}, "ranks") == [(b"a", b"b")]


def test_token_length_bound():
    merges_from_vocab({"a": 0, "a" * MAX_TOKEN_LENGTH: 1}, "v")
    with pytest.raises(TokenizerError, match=rf"v: a token is {MAX_TOKEN_LENGTH + 1} characters long"):
        merges_from_vocab({"a": 0, "a" * (MAX_TOKEN_LENGTH + 1): 1}, "v")


def test_cut_budget_is_checked_before_any_work():
    vocab = {"x" * 1000 + str(i): i for i in range(100)}  # no cut is a merge, but each costs a slice
    with pytest.raises(TokenizerError, match=rf"the 100 tokens average 1002 characters.*cut each one {CUTS_PER_TOKEN}"):
        merges_from_vocab(vocab, "v")


def test_merge_budget_stops_a_quadratic_vocabulary():
    """a, aa, ..., a^100: few enough cuts to look at, but every cut is a merge (4950 > 8 x 100 + 4096)."""
    vocab = {"a" * n: n for n in range(1, 101)}
    with pytest.raises(TokenizerError, match=rf"tokens' cuts are merges \({MERGES_PER_TOKEN} per token"):
        merges_from_vocab(vocab, "v")
