"""Tokenizers: train byte-level BPE and WordPiece, load every format real models ship.

>>> from qkv.tokenizer import load_tokenizer
>>> tok = load_tokenizer("cl100k_base")            # doctest: +SKIP
>>> tok.decode(tok.encode("hello world"))           # doctest: +SKIP
'hello world'
"""

from qkv.tokenizer.base import Encoding, Tokenizer
from qkv.tokenizer.chat_template import CHAT_TEMPLATES
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
