"""A tiny native checkpoint with readable greedy output, for CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qkv.checkpoints.native import save_native
from qkv.tokenizer import train_tokenizer
from tiny_models import tiny_model


def save_tiny_checkpoint(path: Path, corpus: list[str], max_seq_len: int, chat_template: str | None = None) -> Path:
    """A tiny random DecoderLM + byte-level BPE trained on `corpus`, saved natively at `path`.

    Single-byte tokens (and <|endoftext|>) get logit 0 from the head, so greedy text is made of
    multi-character tokens: readable, and never a lone newline. A chat template, if given, goes
    into tokenizer_config.json next to tokenizer.json, where loaders look for it.
    """
    tok = train_tokenizer(kind="bpe", texts=corpus, vocab_size=300, show_progress=False)
    model = tiny_model("tiny-gpt2", vocab_size=tok.vocab_size, max_seq_len=max_seq_len, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[:257] = 0.0  # <|endoftext|> and the 256 bytes
    model.tokenizer = tok
    save_native(model, path)
    if chat_template is not None:
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return path
