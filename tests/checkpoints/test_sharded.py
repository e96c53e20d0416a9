"""Sharded (DCP) training checkpoints in one process: layout, exact resume, and every broken
checkpoint refused with a clear error. (2-rank saves and loads: tests/training/test_distributed.py.)"""

import functools
import json

import pytest
import torch

import qkv
from qkv.checkpoints.sharded import STATE_DIR, check_complete, recover_unfinished_saves, temp_path
from qkv.errors import CheckpointError, UsageError
from qkv.training import BlockLoader, Trainer, TrainingConfig
from tiny_models import TRAIN_SEQ, TRAIN_VOCAB, random_blocks, tiny_trainable_gpt2

VOCAB, SEQ = TRAIN_VOCAB, TRAIN_SEQ
tiny_gpt2 = functools.partial(tiny_trainable_gpt2, n_layers=2)


@pytest.fixture
def blocks():
    return random_blocks()


def config(out, **kw):
    return TrainingConfig(steps=6, lr=3e-3, warmup_steps=2, grad_accum=2, save_every=3, out_dir=str(out),
                          sharded_checkpoint=True, progress=False, **kw)  # fmt: skip


def losses(records):
    return [r["loss"] for r in records if "loss" in r]


def stopped_run(blocks, out):
    """A run stopped after step 4 whose last checkpoint (sharded) is step 3 -> its checkpoint path."""
    Trainer(tiny_gpt2(dropout=0.1), config(out), BlockLoader(blocks[:16], 4), blocks[16:]).train(until=4)
    return out / "checkpoint"


@pytest.fixture
def saved(blocks, tmp_path):
    return stopped_run(blocks, tmp_path / "run")


@pytest.mark.parametrize("threads", [1, "default"], indirect=True, ids=["1-thread", "default-threads"])
def test_sharded_resume_is_bit_exact(blocks, tmp_path, threads):
    saved = stopped_run(blocks, tmp_path / "run")  # at the thread count under test, as the straight run
    straight = Trainer(tiny_gpt2(dropout=0.1), config(tmp_path / "a"), BlockLoader(blocks[:16], 4), blocks[16:])
    expected = straight.train()
    torch.manual_seed(1234)  # RNG states come back from the checkpoint, not from here
    resumed = Trainer.from_checkpoint(saved, BlockLoader(blocks[:16], 4), blocks[16:])
    assert resumed.step == 3 and resumed.sharded_checkpoint
    got = resumed.train()
    assert losses(got) == losses(expected)[3:] and got[-1]["eval_loss"] == expected[-1]["eval_loss"]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_layout_and_the_plain_checkpoint_inside(saved):
    assert {p.name for p in saved.iterdir()} >= {"config.json", "model.safetensors", "training_state.pt", STATE_DIR}
    assert sorted(p.name for p in (saved / STATE_DIR).iterdir()) == [".metadata", "__0_0.distcp"]
    state = torch.load(saved / "training_state.pt", weights_only=True)
    assert state["format"] == "sharded" and state["world_size"] == 1 and state["step"] == 3
    data = state["ranks"][0]["data"]  # 3 steps x 2 micro-batches of 4 batches an epoch: epoch 1, batch 2
    assert "optimizer" not in state and (data["epoch"], data["index"]) == (1, 2)  # the optimizer is in DCP
    model = qkv.load(saved)  # inference reads the plain part
    assert model.config.n_layers == 2 and not any(p.name.startswith(".") for p in saved.parent.iterdir())


def test_missing_metadata_is_refused(saved, blocks):
    (saved / STATE_DIR / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"has no \.metadata: the sharded checkpoint was not written completely"):
        Trainer.from_checkpoint(saved, BlockLoader(blocks[:16], 4))


def test_truncated_shard_is_refused(saved, blocks):
    shard = saved / STATE_DIR / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"__0_0.distcp is truncated \(\d+ bytes, the metadata needs \d+\)"):
        Trainer.from_checkpoint(saved, BlockLoader(blocks[:16], 4))


def test_missing_shard_and_corrupt_metadata_are_refused(saved):
    (saved / STATE_DIR / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__0_0.distcp is missing: the sharded checkpoint is incomplete"):
        check_complete(saved)
    (saved / STATE_DIR / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt"):
        check_complete(saved)


def test_shard_of_the_right_size_but_garbage_is_refused(saved, blocks):
    shard = saved / STATE_DIR / "__0_0.distcp"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(CheckpointError, match="cannot be loaded into this model and optimizer"):
        Trainer.from_checkpoint(saved, BlockLoader(blocks[:16], 4))


def test_a_save_killed_midway_is_ignored_and_removed(saved, blocks, tmp_path, capsys):
    # What a kill during the next save leaves: the temporary directory with part of the files.
    tmp = temp_path(saved)
    (tmp / STATE_DIR).mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    (tmp / STATE_DIR / "__0_0.distcp").write_bytes(b"partial")
    straight = Trainer(tiny_gpt2(dropout=0.1), config(tmp_path / "a"), BlockLoader(blocks[:16], 4), blocks[16:])
    expected = losses(straight.train())[3:]  # (first: the resumed run's dropout draws from the global RNG)
    resumed = Trainer.from_checkpoint(saved, BlockLoader(blocks[:16], 4), blocks[16:])
    assert resumed.step == 3 and not tmp.exists()
    assert f"removed {tmp}, a checkpoint save that did not finish" in capsys.readouterr().err
    assert losses(resumed.train()) == expected


def test_a_kill_between_the_two_renames_restores_the_previous_checkpoint(saved, capsys):
    backup = saved.with_name(f".{saved.name}.previous")
    saved.rename(backup)  # the instant of replace_directory when only the backup exists
    assert recover_unfinished_saves(saved, report=True) == []
    assert (saved / STATE_DIR / ".metadata").is_file() and not backup.exists()
    assert "restored" in capsys.readouterr().err


def test_resuming_with_another_model_config_is_refused(saved, blocks):
    other = tiny_gpt2(d_model=64, dropout=0.1)
    with pytest.raises(
        UsageError, match=r"different model config \(d_ff: saved 128, given 256, d_model: saved 32, given 64"
    ):
        Trainer.from_checkpoint(saved, BlockLoader(blocks[:16], 4), model=other)


def test_ranks_with_different_data_positions_cannot_be_merged(saved, blocks):
    state = torch.load(saved / "training_state.pt", weights_only=True)
    second = json.loads(json.dumps(state["ranks"][0]["data"]))
    second["index"] += 1
    state["ranks"].append({**state["ranks"][0], "data": second})
    state["world_size"] = 2
    torch.save(state, saved / "training_state.pt")
    with pytest.raises(UsageError, match="saved by 2 processes whose data states differ.*resume it with --nproc 2"):
        Trainer.from_checkpoint(saved, BlockLoader(blocks[:16], 4))


def test_the_data_must_be_the_same(saved, blocks):
    with pytest.raises(UsageError, match="the checkpoint was taken with batch_size=4, this run has batch_size=2"):
        Trainer.from_checkpoint(saved, BlockLoader(blocks[:16], 2))
