"""Multi-process training on CPU (gloo): 2 ranks with a global batch of 2B train as 1 process with 2B,
for DDP and FSDP2, and sharded checkpoints resume on another number of ranks.

One torchrun launch (2 processes, module-scoped fixture) runs every 2-rank part and writes its
losses to JSON; the single-process references run in the test process.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_setup import BATCH, HALF, STEPS, config, losses, tiny

from qkv import ModelConfig
from qkv.errors import UsageError
from qkv.training import BlockLoader, Trainer, TrainingConfig
from qkv.training.distributed import DistEnv, detect, split_rows, transformer_blocks

WORKER = r"""
import dataclasses, json, shutil, sys
from pathlib import Path
import torch
from qkv.training import BlockLoader, Trainer, distributed

torch.set_num_threads(1)
blocks, out = torch.load(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, sys.argv[3])  # tests/training: the helpers the test process uses too
from distributed_setup import BATCH, HALF, STEPS, config, losses, tiny as model

env = distributed.init()


def copy(src, dst):
    if env.is_main:
        shutil.copytree(src, dst)
    distributed.barrier()
    return dst


results = {"world_size": env.world_size, "wrapped": {}}
for shard in (False, True):
    name = "fsdp" if shard else "ddp"
    t = Trainer(model(), config(shard=shard), BlockLoader(blocks[:16], BATCH), blocks[16:])
    results[name + "_draws"] = distributed.gather(float(torch.rand(())))  # dropout's RNG, per rank
    results[name] = losses(t.train())
    results["wrapped"][name] = type(t.wrapped).__name__
    results[name + "_local_batch"] = t.train_data.local_batch_size
    # a sharded save at step HALF, resumed by 2 ranks as it was, and (copied) by the other wrapper
    run = out / f"{name}_run"
    first = Trainer(model(), config(shard=shard, save_every=HALF, out_dir=str(run)), BlockLoader(blocks[:16], BATCH))
    first.train(until=HALF)
    for again in (shard, not shard):
        label = f"{name}_then_{'fsdp' if again else 'ddp'}"
        ckpt = copy(run / "checkpoint", out / label / "checkpoint")
        cfg = config(shard=again, out_dir=str(out / label))
        t = Trainer.from_checkpoint(ckpt, BlockLoader(blocks[:16], BATCH), config=cfg)
        results[label] = losses(t.train())

# checkpoints one process saved (in the test: sharded, and native), resumed on 2 ranks with DDP and with FSDP
for source in ("single", "native"):
    for shard in (False, True):
        label = f"{source}_then_" + ("fsdp" if shard else "ddp")
        ckpt = copy(out / f"{source}_run" / "checkpoint", out / label / "checkpoint")
        cfg = config(shard=shard, out_dir=str(out / label))
        t = Trainer.from_checkpoint(ckpt, BlockLoader(blocks[:16], BATCH), config=cfg)
        results[label] = losses(t.train())

if env.is_main:
    (out / "results.json").write_text(json.dumps(results))
distributed.destroy()
"""


@pytest.fixture(scope="module")
def blocks():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (20, 16), generator=g, dtype=torch.int32)


@pytest.fixture(scope="module")
def reference(blocks):
    """1 process, batch 2B, the same data order: the losses (20 train + 1 eval) 2 ranks must match."""
    return losses(Trainer(tiny(), config(), BlockLoader(blocks[:16], BATCH), blocks[16:]).train())


@pytest.fixture(scope="module")
def two_ranks(blocks, tmp_path_factory):
    """The WORKER's results: one `torchrun --nproc-per-node 2` launch on CPU (gloo)."""
    out = tmp_path_factory.mktemp("dist")
    torch.save(blocks, out / "blocks.pt")
    (out / "worker.py").write_text(WORKER)
    # one process saves a sharded and a native checkpoint at step HALF, for the 2-rank resumes
    for source, sharded in (("single", True), ("native", False)):
        single = config(save_every=HALF, out_dir=str(out / f"{source}_run"), sharded_checkpoint=sharded)
        Trainer(tiny(), single, BlockLoader(blocks[:16], BATCH)).train(until=HALF)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(out / "worker.py"), str(out / "blocks.pt"), str(out), str(Path(__file__).parent)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(two_ranks, reference, wrapper):
    _, results = two_ranks
    assert results["world_size"] == 2 and results[wrapper + "_local_batch"] == BATCH // 2
    assert results["wrapped"][wrapper] == ("DistributedDataParallel" if wrapper == "ddp" else "FSDPDecoderLM")
    assert len(results[wrapper]) == STEPS + 1  # 20 steps, then the evaluation
    assert len(set(results[wrapper + "_draws"])) == 2  # each rank draws its own dropout masks
    torch.testing.assert_close(torch.tensor(results[wrapper]), torch.tensor(reference), rtol=0, atol=1e-5)
    assert reference[-2] < reference[0] - 0.3  # it learned: the comparison is not of two flat lines


@pytest.mark.parametrize("saved_by", ["ddp", "fsdp"])
@pytest.mark.parametrize("resumed_by", ["ddp", "fsdp"])
def test_sharded_checkpoint_resumes_on_two_ranks_with_either_wrapper(two_ranks, saved_by, resumed_by):
    _, results = two_ranks
    resumed = results[f"{saved_by}_then_{resumed_by}"]
    if saved_by == resumed_by:  # the same ranks and wrapper: bit for bit
        assert resumed == results[saved_by][HALF:STEPS]
    else:
        expected = torch.tensor(results[saved_by][HALF:STEPS])
        torch.testing.assert_close(torch.tensor(resumed), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_checkpoint_of_two_ranks_resumes_on_one(two_ranks, blocks, reference, wrapper):
    out, _ = two_ranks
    checkpoint = out / f"{wrapper}_run" / "checkpoint"
    shards = sorted(p.name for p in (checkpoint / "distributed").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    cfg = config(out_dir=str(out / f"{wrapper}_on_one"))
    resumed = Trainer.from_checkpoint(checkpoint, BlockLoader(blocks[:16], BATCH), blocks[16:], config=cfg)
    assert resumed.step == HALF and resumed.sharded_checkpoint is False  # one process, config default: native
    got = losses(resumed.train())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference[HALF:]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
@pytest.mark.parametrize("source", ["single", "native"], ids=["sharded-checkpoint", "native-checkpoint"])
def test_checkpoint_of_one_process_resumes_on_two_ranks(two_ranks, reference, wrapper, source):
    _, results = two_ranks
    got = results[f"{source}_then_{wrapper}"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference[HALF:STEPS]), rtol=0, atol=1e-5)


def test_two_ranks_write_a_plain_checkpoint_too(two_ranks, blocks):
    """Rank 0 writes config.json + model.safetensors, which `qkv.load` reads without torch.distributed."""
    import qkv

    out, _ = two_ranks
    model = qkv.load(out / "fsdp_run" / "checkpoint")
    resumed = Trainer.from_checkpoint(out / "fsdp_run" / "checkpoint", BlockLoader(blocks[:16], BATCH))
    for (name, a), b in zip(model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the plain weights are the sharded state's, gathered


def test_global_batch_must_split_over_the_ranks():
    assert split_rows(8, DistEnv(0, 2)) == 4
    with pytest.raises(UsageError, match=r"--batch-size 6 is the global batch .* use a multiple of 4 \(e.g. 4 or 8\)"):
        split_rows(6, DistEnv(0, 4))
    with pytest.raises(UsageError, match=r"must split evenly over 3 processes; use a multiple of 3 \(e.g. 3 or 6\)"):
        BlockLoader(torch.zeros(8, 4, dtype=torch.int32), 4).shard(0, 3)


def test_ranks_read_disjoint_rows_that_make_up_the_global_batch():
    blocks = torch.arange(24, dtype=torch.int32).view(12, 2)
    whole = BlockLoader(blocks, 6, seed=3)
    ranks = [BlockLoader(blocks, 6, seed=3) for _ in range(3)]
    for rank, loader in enumerate(ranks):
        loader.shard(rank, 3)
    for _ in range(5):  # across an epoch boundary (2 batches per epoch)
        parts = [loader.next_batch() for loader in ranks]
        assert all(len(p) == 2 for p in parts)
        assert torch.equal(torch.cat(parts), whole.next_batch())
    assert ranks[1].state_dict() == whole.state_dict()  # the position does not depend on the rank


def test_env_detection(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert detect() == DistEnv(rank=2, world_size=4, local_rank=0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UsageError, match="RANK=4 and WORLD_SIZE=4"):
        detect()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert detect() == DistEnv()


def test_fsdp_shards_every_block_of_each_family():
    from qkv.models import EncoderDecoder

    decoder = tiny()
    assert transformer_blocks(decoder) == list(decoder.blocks)
    seq2seq = EncoderDecoder(ModelConfig.from_name("tiny-t5", n_layers=2))
    assert len(transformer_blocks(seq2seq)) == 2 * 2


def test_a_source_without_shard_is_refused_on_several_ranks(monkeypatch):
    class Endless:
        def next_batch(self):
            return torch.zeros(2, 4, dtype=torch.int64)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    import qkv.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module.distributed, "init", lambda: DistEnv(0, 2))
    with pytest.raises(UsageError, match="needs a batch source with shard"):
        Trainer(tiny(), config(), Endless())


def test_several_ranks_always_save_sharded(monkeypatch):
    import qkv.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module.distributed, "init", lambda: DistEnv(0, 2))
    with pytest.raises(UsageError, match="sharded_checkpoint=False cannot be used on 2 processes"):
        Trainer(tiny(), config(sharded_checkpoint=False), BlockLoader(torch.zeros(8, 4, dtype=torch.int32), 4))


def test_config_round_trips_the_new_fields():
    cfg = dataclasses.replace(config(), shard=True, sharded_checkpoint=True)
    assert TrainingConfig(**cfg.to_dict()) == cfg
