"""Fine-tune a pre-trained encoder for sequence classification: what `qkv finetune` runs.

    trainer = finetune("all-minilm-l6-v2", read_labelled("train.tsv"), TrainingConfig(steps=300, lr=5e-5,
                       out_dir="runs/cls"), val=read_labelled("val.tsv"))
    qkv.load("runs/cls/checkpoint")   # an Encoder with a classification head; labels in config.extra["labels"]

The model's body keeps its pre-trained weights and a new classification head is put on top
(`with_classification_head`); the examples go through the same `BlockLoader` and `Trainer` as
pre-training, with `classification_batch` as the collate and accuracy counted at each evaluation.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from qkv.checkpoints.native import load_native
from qkv.errors import UsageError
from qkv.training.classification import (
    LabelledTexts,
    classification_accuracy,
    classification_batch,
    encode_examples,
    label_names_of,
    with_classification_head,
)
from qkv.training.data import BlockLoader
from qkv.training.pretrain import run_checkpoint, seed_everything
from qkv.training.trainer import Trainer, TrainingConfig

TASKS = ("classification",)


def split_off(data: LabelledTexts, fraction: float, seed: int = 0) -> tuple[LabelledTexts, LabelledTexts]:
    """(rest, held out): a seeded random `fraction` of the examples held out (at least one when > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"val_fraction={fraction} must be in [0, 1)")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = 0 if fraction == 0 else max(1, round(len(data) * fraction))
    if len(data) - n_val < 1:
        raise UsageError(f"{len(data)} examples are too few to hold out {n_val} for validation; add examples")
    return data.subset(sorted(order[n_val:])), data.subset(sorted(order[:n_val]))


def finetune(
    model: str | os.PathLike | nn.Module,
    train: LabelledTexts,
    config: TrainingConfig,
    *,
    val: LabelledTexts | None = None,
    val_fraction: float = 0.1,
    max_len: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    resume: bool = False,
) -> Trainer:
    """Fine-tune `model` (a source for `qkv.load`, or an encoder) to classify `train` -> the trained `Trainer`.

    val: held-out examples (default: a seeded `val_fraction` of train); max_len: tokens per example
    ([CLS] and [SEP] included; longer texts are cut); resume: continue the run saved in
    `<config.out_dir>/checkpoint` (give the same data and options).
    """
    checkpoint = run_checkpoint(config, resume)
    if val is None and val_fraction > 0:
        train, val = split_off(train, val_fraction, seed)
    if checkpoint is not None:
        classifier = load_native(checkpoint)
        labels = label_names_of(classifier)
    else:
        seed_everything(seed)
        if not isinstance(model, nn.Module):
            from qkv.loading import load

            model = load(model)
        labels = label_names_of(model) if model.config.head == "classification" else train.label_names()
        classifier = with_classification_head(model, labels)
    tokenizer = getattr(classifier, "tokenizer", None)
    if tokenizer is None:
        raise UsageError("the model carries no tokenizer, so the texts cannot be encoded; load one that has it")
    max_len = min(max_len, classifier.config.max_seq_len)
    pad = classifier.config.pad_token_id if classifier.config.pad_token_id is not None else 0
    rows = encode_examples(tokenizer, train, labels, max_len, pad)
    if batch_size > len(rows):
        raise UsageError(f"batch_size={batch_size} is larger than the {len(rows)} training examples; lower it")
    val_rows = encode_examples(tokenizer, val, labels, max_len, pad) if val is not None and len(val) else None
    loader = BlockLoader(rows, batch_size, seed=seed)
    options: dict[str, Any] = {"accuracy": classification_accuracy}
    if checkpoint is not None:
        trainer = Trainer.from_checkpoint(
            checkpoint, loader, val_rows, classification_batch, config=config, model=classifier, **options
        )
    else:
        trainer = Trainer(classifier, config, loader, val_rows, classification_batch, **options)
    trainer.train()
    return trainer
