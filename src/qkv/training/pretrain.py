"""Pretrain a model on text files: tokenizer, data, model, objective and `Trainer` wired together.

This is what `qkv train` runs. The objective decides the rest:

| objective | model | tokenizer trained | batch |
|---|---|---|---|
| `causal` (default) | a decoder preset (`DecoderLM`) | byte-level BPE | next-token prediction |
| `mlm` | an encoder preset with the MLM head | WordPiece | `MaskedLMCollator` (15%, 80/10/10) |
| `rtd` | ELECTRA: the preset as discriminator + a 1/4-size generator | WordPiece | the same masking |

A fresh run trains a tokenizer on the corpus (unless one is given), builds the preset with the
tokenizer's vocabulary, and trains. A resumed run takes the model and tokenizer from
`<out_dir>/checkpoint` and continues exactly where it stopped; give it the same corpus, objective,
seq_len, batch_size and val_fraction as the original run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qkv.checkpoints.native import load_native
from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models import DecoderLM, Encoder
from qkv.training.data import BlockLoader, causal_lm_batch, corpus_files, load_corpus
from qkv.training.electra import ReplacedTokenDetection, generator_config, replaced_token_accuracy
from qkv.training.masking import MaskedLMCollator, masked_token_accuracy
from qkv.training.trainer import CHECKPOINT_DIR, Trainer, TrainingConfig

OBJECTIVES = ("causal", "mlm", "rtd")
# The model family each objective trains, and the head its checkpoint has (rtd: the discriminator's).
OBJECTIVE_FAMILY = {"causal": "decoder", "mlm": "encoder", "rtd": "encoder"}
OBJECTIVE_HEAD = {"causal": "lm", "mlm": "mlm", "rtd": "rtd"}


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


def get_tokenizer(
    source: Any, corpus: Sequence[str | os.PathLike], vocab_size: int, progress: bool = True, kind: str = "bpe"
) -> Any:
    """`source` as a tokenizer: None trains a `kind` tokenizer ("bpe" or "wordpiece") on the corpus,
    a path is loaded, anything else is used as is."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        return source
    from qkv.tokenizer import load_tokenizer, train_tokenizer

    if source is not None:
        return load_tokenizer(source)
    files = corpus_files(corpus)
    return train_tokenizer(kind=kind, vocab_size=vocab_size, files=files, show_progress=progress)


def run_checkpoint(config: TrainingConfig, resume: bool) -> Path | None:
    """The checkpoint a resumed run continues from; for a fresh run, a check that none is there."""
    checkpoint = Path(config.out_dir) / CHECKPOINT_DIR if config.out_dir else None
    if resume:
        if checkpoint is None:
            raise UsageError("resume needs the run directory (out_dir) holding checkpoint/")
        return checkpoint
    if checkpoint is not None and checkpoint.exists():
        raise UsageError(
            f"{config.out_dir} already holds a run (checkpoint/); resume it or choose another run directory"
        )
    return None


def check_objective(objective: str, cfg: ModelConfig, preset: str | None = None) -> None:
    """Refuse an objective the config's model family cannot train (or an unknown objective)."""
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    want = OBJECTIVE_FAMILY[objective]
    if cfg.family != want:
        examples = "tiny-gpt2, tiny-llama" if want == "decoder" else "tiny-bert, electra-small"
        raise UsageError(
            f"objective {objective!r} trains family {want!r}, but preset {preset or '(this config)'!r} has family "
            f"{cfg.family!r}; choose a preset of family {want!r} (e.g. {examples})"
        )


def build_pretraining_model(
    cfg: ModelConfig, objective: str, tokenizer: Any, generator_size: float = 0.25
) -> nn.Module:
    """The model `objective` trains from the preset config `cfg` (vocabulary already set)."""
    check_objective(objective, cfg)
    if objective == "causal":
        model = DecoderLM(cfg)
    elif objective == "mlm":
        model = Encoder(cfg.replace(head="mlm"))
    else:
        discriminator = Encoder(cfg.replace(head="rtd"))
        discriminator.tokenizer = tokenizer
        return ReplacedTokenDetection(discriminator, Encoder(generator_config(discriminator.config, generator_size)))
    model.tokenizer = tokenizer
    return model


def pretrain(
    corpus: Sequence[str | os.PathLike],
    preset: str,
    config: TrainingConfig,
    *,
    objective: str = "causal",
    seq_len: int | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    resume: bool = False,
    mask_prob: float = 0.15,
    whole_word: bool = False,
) -> Trainer:
    """Train a `preset` model with `objective` on `corpus` (text files or directories of *.txt) -> the `Trainer`.

    seq_len: tokens per sequence (default: min(256, the preset's max_seq_len)); tokenizer: a
    tokenizer, a path to one, or None to train one with `vocab_size` (default: the preset's)
    entries; resume: continue from `<config.out_dir>/checkpoint` (model and tokenizer come from
    there); mask_prob, whole_word: the masking of `mlm` and `rtd` (`MaskedLMCollator`).
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    checkpoint = run_checkpoint(config, resume)
    if checkpoint is not None:
        model = ReplacedTokenDetection.from_checkpoint(checkpoint) if objective == "rtd" else load_native(checkpoint)
        if model.config.head != OBJECTIVE_HEAD[objective]:
            raise UsageError(
                f"{checkpoint} holds a model with head {model.config.head!r}, not one that objective {objective!r} "
                "trains; resume with the objective the run was started with"
            )
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise UsageError(f"{checkpoint} has no tokenizer.json, so the corpus cannot be re-encoded for resume")
    else:
        seed_everything(seed)
        cfg = ModelConfig.from_name(preset)
        check_objective(objective, cfg, preset)
        kind = "bpe" if objective == "causal" else "wordpiece"
        tokenizer = get_tokenizer(tokenizer, corpus, vocab_size or cfg.vocab_size, config.progress, kind)
        roles = ("bos_token_id", "eos_token_id") + (() if objective == "causal" else ("pad_token_id",))
        cfg = cfg.replace(vocab_size=vocab_size_of(tokenizer), **{r: getattr(tokenizer, r, None) for r in roles})
        model = build_pretraining_model(cfg, objective, tokenizer)
    max_len = model.config.max_seq_len
    seq_len = seq_len or min(256, max_len)
    if seq_len > max_len:
        raise UsageError(f"seq_len={seq_len} exceeds the model's context of {max_len} tokens (max_seq_len)")
    options: dict[str, Any] = {}
    if objective == "causal":
        eos_id = getattr(tokenizer, "eos_token_id", None)
        data = load_corpus(corpus, tokenizer, seq_len, val_fraction, eos_id=eos_id)
        collate = causal_lm_batch
    else:
        # Files are joined with [SEP] between them; each block gets [CLS] in front (so seq_len - 1 here).
        collate = MaskedLMCollator.from_tokenizer(
            tokenizer, model.config.vocab_size, mask_prob=mask_prob, whole_word=whole_word, seed=seed
        )
        sep = tokenizer.special_tokens.get("sep_token")
        data = load_corpus(
            corpus, tokenizer, seq_len - 1, val_fraction, eos_id=tokenizer.token_to_id(sep) if sep else None
        )
        options = {
            "eval_collate": collate.fixed(),
            "accuracy": masked_token_accuracy if objective == "mlm" else replaced_token_accuracy,
        }
    loader = BlockLoader(data.train, batch_size, seed=seed)
    if checkpoint is not None:
        trainer = Trainer.from_checkpoint(checkpoint, loader, data.val, collate, config=config, model=model, **options)
    else:
        trainer = Trainer(model, config, loader, data.val, collate, **options)
    trainer.train()
    return trainer
