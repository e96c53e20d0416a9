"""`TrainingConfig(compile=True)` / `qkv train --compile`: a torch.compile'd training step that
trains as the eager one does, and resumes."""

import argparse

import pytest
import torch

from qkv.cli.train import add_training_arguments, training_config
from qkv.training import BlockLoader, Trainer, TrainingConfig
from tiny_models import TRAIN_SEQ, TRAIN_VOCAB, random_blocks, tiny_trainable_gpt2

VOCAB, SEQ = TRAIN_VOCAB, TRAIN_SEQ
tiny_gpt2 = tiny_trainable_gpt2


@pytest.fixture
def blocks():
    return random_blocks()


def config(out=None, compile=False, steps=4):
    return TrainingConfig(steps=steps, lr=3e-3, warmup_steps=1, grad_clip=0.5, save_every=2, progress=False,
                          out_dir=str(out) if out else None, compile=compile)  # fmt: skip


def test_compile_wraps_only_the_training_step(blocks):
    model = tiny_gpt2()
    trainer = Trainer(model, config(compile=True), BlockLoader(blocks, 2))
    assert isinstance(trainer.wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.wrapped._orig_mod is model and trainer.model is model  # eval and save stay eager
    assert not isinstance(Trainer(tiny_gpt2(), config(), BlockLoader(blocks, 2)).wrapped, type(trainer.wrapped))


def test_cli_flag_reaches_the_config(tmp_path):
    p = argparse.ArgumentParser()
    add_training_arguments(p, out_default="runs/x", batch_size=8, lr=1e-3, weight_decay=0.1)
    assert training_config(p.parse_args(["--steps", "3", "--compile"]), tmp_path).compile is True
    assert training_config(p.parse_args(["--steps", "3"]), tmp_path).compile is False


@pytest.mark.slow  # two compilations of a forward + backward (~30 s on 2 cores)
def test_compiled_training_matches_eager_and_resumes(blocks, tmp_path):
    eager = Trainer(tiny_gpt2(), config(), BlockLoader(blocks[:16], 2)).train()
    straight = Trainer(tiny_gpt2(), config(tmp_path / "a", compile=True), BlockLoader(blocks[:16], 2)).train()
    # Inductor fuses the layer norms, GELU, residual adds and the loss, so float32 sums run in
    # another order: about 1e-6 relative per op. Five steps of AdamW at lr 3e-3 on a loss of ~4.2
    # keep the losses within 1e-4 of each other (measured: under 1e-6); a wrong graph (a missed
    # mask, a dropped gradient) moves them by 1e-2 or more from the first update on.
    assert [r["loss"] for r in straight] == pytest.approx([r["loss"] for r in eager], abs=1e-4, rel=0)
    assert straight[0]["loss"] == pytest.approx(eager[0]["loss"], abs=1e-5, rel=0)  # before any update

    run = tmp_path / "b"
    first = Trainer(tiny_gpt2(), config(run, compile=True), BlockLoader(blocks[:16], 2))
    first.train(until=3)  # checkpoint at step 2, then "killed" after step 3
    resumed = Trainer.from_checkpoint(run / "checkpoint", BlockLoader(blocks[:16], 2))
    assert resumed.config.compile and resumed.step == 2
    # The same compiled kernels on the same state: the same floats as the uninterrupted run.
    assert [r["loss"] for r in resumed.train()] == [r["loss"] for r in straight[2:]]
