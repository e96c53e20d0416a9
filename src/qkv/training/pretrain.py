"""Pretrain a decoder LM on text files: tokenizer, data, model and `Trainer` wired together.

This is what `qkv train` runs. A fresh run trains a byte-level BPE tokenizer on the corpus (unless
one is given), builds the preset with the tokenizer's vocabulary, and trains. A resumed run
takes the model and tokenizer from `<out_dir>/checkpoint` and continues exactly where it stopped;
give it the same corpus, seq_len, batch_size and val_fraction as the original run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkv.checkpoints.native import load_native
from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models import DecoderLM
from qkv.training.data import BlockLoader, corpus_files, load_corpus
from qkv.training.trainer import CHECKPOINT_DIR, Trainer, TrainingConfig


def seed_everything(seed: int) -> None:
    """Seed torch, Python `random` and NumPy (model init and anything else drawn from global RNGs)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def vocab_size_of(tokenizer: Any) -> int:
    """Vocabulary size of a qkv `Tokenizer` or a `tokenizers.Tokenizer` (added tokens included)."""
    if hasattr(tokenizer, "vocab_size"):
        return int(tokenizer.vocab_size)
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def get_tokenizer(source: Any, corpus: Sequence[str | os.PathLike], vocab_size: int, progress: bool = True) -> Any:
    """`source` as a tokenizer: None trains byte-level BPE on the corpus, a path is loaded, else as is."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        return source
    from qkv.tokenizer import load_tokenizer, train_tokenizer

    if source is not None:
        return load_tokenizer(source)
    files = corpus_files(corpus)
    return train_tokenizer(kind="bpe", vocab_size=vocab_size, files=files, show_progress=progress)


def pretrain(
    corpus: Sequence[str | os.PathLike],
    preset: str,
    config: TrainingConfig,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    resume: bool = False,
) -> Trainer:
    """Train a `preset` decoder on `corpus` (text files or directories of *.txt) -> the trained `Trainer`.

    seq_len: block length (default: min(256, the preset's max_seq_len)); tokenizer: a tokenizer,
    a path to one, or None to train BPE with `vocab_size` (default: the preset's) entries;
    resume: continue from `<config.out_dir>/checkpoint` (model and tokenizer come from there).
    """
    if resume:
        if not config.out_dir:
            raise UsageError("resume needs the run directory (out_dir) holding checkpoint/")
        checkpoint = Path(config.out_dir) / CHECKPOINT_DIR
        model = load_native(checkpoint)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise UsageError(f"{checkpoint} has no tokenizer.json, so the corpus cannot be re-encoded for resume")
    else:
        if config.out_dir and (Path(config.out_dir) / CHECKPOINT_DIR).exists():
            raise UsageError(
                f"{config.out_dir} already holds a run (checkpoint/); resume it or choose another run directory"
            )
        seed_everything(seed)
        cfg = ModelConfig.from_name(preset)
        tokenizer = get_tokenizer(tokenizer, corpus, vocab_size or cfg.vocab_size, config.progress)
        cfg = cfg.replace(
            vocab_size=vocab_size_of(tokenizer),
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
            eos_token_id=getattr(tokenizer, "eos_token_id", None),
        )
        model = DecoderLM(cfg)
        model.tokenizer = tokenizer
    max_len = model.config.max_seq_len
    seq_len = seq_len or min(256, max_len)
    if seq_len > max_len:
        raise UsageError(f"seq_len={seq_len} exceeds the model's context of {max_len} tokens (max_seq_len)")
    data = load_corpus(corpus, tokenizer, seq_len, val_fraction, eos_id=getattr(tokenizer, "eos_token_id", None))
    loader = BlockLoader(data.train, batch_size, seed=seed)
    if resume:
        trainer = Trainer.from_checkpoint(checkpoint, loader, data.val, config=config, model=model)
    else:
        trainer = Trainer(model, config, loader, data.val)
    trainer.train()
    return trainer
