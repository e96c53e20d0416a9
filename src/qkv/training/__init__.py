"""Training: data streams and packing, objectives (causal LM, masked LM, ELECTRA, classification),
AdamW + schedule, the `Trainer` loop, run metrics."""

from qkv.training.classification import (
    LabelledTexts,
    classification_accuracy,
    classification_batch,
    encode_examples,
    label_names_of,
    predict,
    read_labelled,
    with_classification_head,
    write_labelled,
)
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
from qkv.training.electra import ReplacedTokenDetection, generator_config, replaced_token_accuracy
from qkv.training.finetune import finetune
from qkv.training.instruct import ChatCollate, InstructTask, explain_function_task, instruct_finetune
from qkv.training.masking import MaskedLMCollator, masked_token_accuracy
from qkv.training.metrics import MetricsLog
from qkv.training.optim import WarmupCosine, build_optimizer, param_groups, split_decay
from qkv.training.pretrain import pretrain
from qkv.training.trainer import NonFiniteLossError, Trainer, TrainingConfig
from qkv.viz.loss_curve import plot_loss_curve

__all__ = [
    "BlockLoader",
    "ChatCollate",
    "Corpus",
    "InstructTask",
    "LabelledTexts",
    "MaskedLMCollator",
    "MetricsLog",
    "NonFiniteLossError",
    "ReplacedTokenDetection",
    "Trainer",
    "TrainingConfig",
    "WarmupCosine",
    "build_optimizer",
    "causal_lm_batch",
    "classification_accuracy",
    "classification_batch",
    "encode_examples",
    "explain_function_task",
    "finetune",
    "generator_config",
    "instruct_finetune",
    "iter_blocks",
    "label_names_of",
    "load_corpus",
    "masked_token_accuracy",
    "pack_blocks",
    "param_groups",
    "plot_loss_curve",
    "predict",
    "pretrain",
    "read_labelled",
    "replaced_token_accuracy",
    "split_blocks",
    "split_decay",
    "tokenize_files",
    "with_classification_head",
    "write_labelled",
]
