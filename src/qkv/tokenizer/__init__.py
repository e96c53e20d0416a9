"""Tokenizers: train byte-level BPE and WordPiece, load every format real models ship.

>>> from qkv.tokenizer import load_tokenizer
>>> tok = load_tokenizer("cl100k_base")            # doctest: +SKIP
>>> tok.decode(tok.encode("hello world"))           # doctest: +SKIP
'hello world'
"""

from typing import Any

from qkv.tokenizer.base import Encoding, Tokenizer
from qkv.tokenizer.gguf_vocab import load_gguf_tokenizer, read_gguf_metadata, tokenizer_from_gguf_fields
from qkv.tokenizer.loaders import load_tokenizer
from qkv.tokenizer.tiktoken_format import tokenizer_from_tiktoken
from qkv.tokenizer.train import train_tokenizer

__all__ = [
    "CHAT_TEMPLATES",
    "Encoding",
    "Tokenizer",
    "load_gguf_tokenizer",
    "load_tokenizer",
    "read_gguf_metadata",
    "tokenizer_from_gguf_fields",
    "tokenizer_from_tiktoken",
    "train_tokenizer",
]


def __getattr__(name: str) -> Any:
    # Chat templates need Jinja (~15 ms to import): only when one is asked for or applied, which
    # loading a model, encoding, decoding and generating from ids or text never do.
    if name == "CHAT_TEMPLATES":
        from qkv.tokenizer.chat_template import CHAT_TEMPLATES

        return CHAT_TEMPLATES
    raise AttributeError(f"module 'qkv.tokenizer' has no attribute {name!r}")
