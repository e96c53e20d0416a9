"""Training: data streams and packing, AdamW + schedule, the `Trainer` loop, run metrics."""

from qkv.training.data import (
    BlockLoader,
    Corpus,
    causal_lm_batch,
    iter_blocks,
    load_corpus,
    pack_blocks,
    split_blocks,
    tokenize_files,
)
from qkv.training.metrics import MetricsLog
from qkv.training.optim import WarmupCosine, build_optimizer, param_groups, split_decay
from qkv.training.trainer import NonFiniteLossError, Trainer, TrainingConfig
from qkv.viz.loss_curve import plot_loss_curve

__all__ = [
    "BlockLoader",
    "Corpus",
    "MetricsLog",
    "NonFiniteLossError",
    "Trainer",
    "TrainingConfig",
    "WarmupCosine",
    "build_optimizer",
    "causal_lm_batch",
    "iter_blocks",
    "load_corpus",
    "pack_blocks",
    "param_groups",
    "plot_loss_curve",
    "split_blocks",
    "split_decay",
    "tokenize_files",
]
