"""What the 2-process training tests share between the test process and the torchrun workers
(`test_distributed.py`): the tiny model, the run's config and the losses it logs."""

from __future__ import annotations

import torch

from qkv import DecoderLM, ModelConfig
from qkv.training import TrainingConfig

STEPS, HALF, BATCH = 20, 10, 4


def tiny() -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-gpt2", vocab_size=64, d_model=32, n_heads=2, n_layers=2, max_seq_len=16)
    return DecoderLM(cfg)


def config(**kw) -> TrainingConfig:
    return TrainingConfig(steps=STEPS, lr=3e-3, warmup_steps=2, grad_clip=0.5, progress=False, **kw)


def losses(records: list[dict]) -> list[float]:
    return [r.get("loss", r.get("eval_loss")) for r in records]
