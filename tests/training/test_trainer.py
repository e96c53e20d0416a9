"""The training loop: it learns, resumes bit-exactly, guards against NaN, and records the run."""

import json
import math
import subprocess
import sys

import pytest
import torch

import qkv
from qkv.training import BlockLoader, NonFiniteLossError, Trainer, TrainingConfig
from tiny_models import TRAIN_SEQ, TRAIN_VOCAB, random_blocks, tiny_trainable_gpt2

VOCAB, SEQ = TRAIN_VOCAB, TRAIN_SEQ


# One layer, 32 wide: a training step takes milliseconds. (Trainer.train() puts it in train mode.)
tiny_gpt2 = tiny_trainable_gpt2


@pytest.fixture
def blocks():
    return random_blocks()


def test_overfits_one_batch(blocks):
    loader = BlockLoader(blocks[:4], batch_size=4, shuffle=False)
    config = TrainingConfig(steps=120, lr=1e-2, warmup_steps=10, weight_decay=0.0, progress=False)
    records = Trainer(tiny_gpt2(), config, loader).train()
    assert records[0]["loss"] > 3.5  # ~ln(64) at init
    assert records[-1]["loss"] < 0.1


@pytest.mark.parametrize("threads", [1, "default"], indirect=True, ids=["1-thread", "default-threads"])
def test_resume_gives_the_same_losses_bit_for_bit(blocks, tmp_path, threads):
    # Dropout, shuffling, accumulation and clipping all on: every piece of state must come back.
    # Bit for bit with one thread and with torch's default count (both runs use the same count).
    def config(out):
        return TrainingConfig(steps=6, lr=3e-3, warmup_steps=2, grad_accum=2, grad_clip=0.5, eval_every=3,
                              save_every=3, out_dir=str(out), progress=False)  # fmt: skip

    straight = Trainer(tiny_gpt2(dropout=0.1), config(tmp_path / "a"), BlockLoader(blocks[:16], 2), blocks[16:])
    expected = straight.train()

    run = tmp_path / "b"
    first = Trainer(tiny_gpt2(dropout=0.1), config(run), BlockLoader(blocks[:16], 2), blocks[16:])
    first.train(until=4)  # checkpoint at step 3, then "killed" during step 5
    torch.manual_seed(1234)  # a new process starts from other RNG states
    resumed = Trainer.from_checkpoint(run / "checkpoint", BlockLoader(blocks[:16], 2), blocks[16:])
    assert resumed.step == 3 and resumed.model is not first.model
    resumed.train()

    assert [r["loss"] for r in first.history[:3]] + [r["loss"] for r in resumed.history if "loss" in r] == [
        r["loss"] for r in expected if "loss" in r
    ]
    assert resumed.history[-1]["eval_loss"] == expected[-1]["eval_loss"]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # metrics.jsonl of the interrupted run has each step once: step 4 was dropped and redone.
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


RESUME_IN_A_NEW_PROCESS = """
import json, sys, torch
from qkv.training import BlockLoader, Trainer
torch.set_num_threads(1)
blocks = torch.load(sys.argv[2])
trainer = Trainer.from_checkpoint(sys.argv[1], BlockLoader(blocks[:16], 2), blocks[16:])
print(json.dumps([r["loss"] for r in trainer.train() if "loss" in r]))
"""


def test_resume_in_a_new_process(blocks, tmp_path):
    def trainer(out):
        config = TrainingConfig(steps=4, lr=3e-3, warmup_steps=1, save_every=2, out_dir=str(out), progress=False)
        return Trainer(tiny_gpt2(dropout=0.1), config, BlockLoader(blocks[:16], 2), blocks[16:])

    expected = [r["loss"] for r in trainer(tmp_path / "a").train() if "loss" in r]
    trainer(tmp_path / "b").train(until=2)
    torch.save(blocks, tmp_path / "blocks.pt")
    script = [
        sys.executable,
        "-c",
        RESUME_IN_A_NEW_PROCESS,
        str(tmp_path / "b" / "checkpoint"),
        str(tmp_path / "blocks.pt"),
    ]
    out = subprocess.run(script, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == expected[2:]


def test_grad_accumulation_matches_one_big_batch(blocks):
    def one_step(batch_size, grad_accum):
        model = tiny_gpt2()
        config = TrainingConfig(steps=1, lr=1e-3, grad_accum=grad_accum, progress=False)
        Trainer(model, config, BlockLoader(blocks[:4], batch_size, shuffle=False)).train()
        return model.state_dict()

    for name, (a, b) in {k: (v, one_step(2, 2)[k]) for k, v in one_step(4, 1).items()}.items():
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("lr", [math.inf])
def test_nan_guard_stops_at_the_first_bad_step(blocks, lr):
    config = TrainingConfig(steps=5, lr=lr, min_lr=0.0, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"step 2: the loss is nan"):
        Trainer(tiny_gpt2(), config, BlockLoader(blocks, 4)).train()


def test_nan_guard_names_the_step_and_skips_the_update(blocks):
    model = tiny_gpt2()
    calls = []

    def poison_third_loss(module, args, kwargs, output):
        calls.append(1)
        if len(calls) == 3:
            output.loss = output.loss * math.inf
        return output

    model.register_forward_hook(poison_third_loss, with_kwargs=True)
    trainer = Trainer(model, TrainingConfig(steps=5, lr=1e-3, progress=False), BlockLoader(blocks, 4))
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is inf") as info:
        trainer.train()
    assert "Lower the learning rate" in str(info.value)
    assert trainer.step == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_metrics_jsonl_and_loss_curve(blocks, tmp_path):
    config = TrainingConfig(steps=4, lr=1e-3, eval_every=2, out_dir=str(tmp_path), progress=False)
    Trainer(tiny_gpt2(), config, BlockLoader(blocks[:16], 4), blocks[16:]).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert set(train[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    assert train[0]["tokens"] == 4 * SEQ and train[0]["lr"] == 1e-3
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert qkv.checkpoints.is_native_checkpoint(tmp_path / "checkpoint")  # saved after the last step


def test_bf16_autocast_trains(blocks):
    config = TrainingConfig(steps=2, lr=1e-3, bf16=True, progress=False)
    model = tiny_gpt2()
    records = Trainer(model, config, BlockLoader(blocks, 4), blocks[:4]).train()
    assert all(math.isfinite(r.get("loss", r.get("eval_loss"))) for r in records)
    assert model.lm_head.weight.dtype == torch.float32  # autocast leaves the weights in float32


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainingConfig(steps=1, grad_accum=0)


def test_grad_checkpoint_recomputes_blocks_and_trains_the_same(blocks):
    from qkv.models.stack import TransformerStack

    def run(grad_checkpoint):
        model = tiny_gpt2()
        config = TrainingConfig(steps=3, lr=1e-3, grad_checkpoint=grad_checkpoint, progress=False)
        records = Trainer(model, config, BlockLoader(blocks, 4, shuffle=False)).train()
        stacks = [m for m in model.modules() if isinstance(m, TransformerStack)]
        return [s.grad_checkpointing for s in stacks], [r["loss"] for r in records], model.state_dict()

    (plain_flags, plain_losses, plain_state), (flags, losses, state) = run(False), run(True)
    assert plain_flags == [False] and flags == [True]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=0, atol=1e-6)
    for name, value in plain_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_grad_checkpoint_needs_transformer_blocks(blocks):
    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 4)

    with pytest.raises(qkv.errors.UsageError, match="grad_checkpoint: Bag holds no TransformerStack"):
        Trainer(Bag(), TrainingConfig(steps=1, grad_checkpoint=True, progress=False), BlockLoader(blocks, 4))
