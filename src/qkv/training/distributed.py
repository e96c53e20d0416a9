"""Multi-process training through `torch.distributed`: the process group, the model wrapper, reductions.

qkv runs under `torchrun`, which starts one process per rank and tells each its place through
the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `init()` reads it and
joins the process group (gloo on CPU, NCCL on CUDA); `wrap()` puts the model in DDP (every rank
holds all the weights; gradients are averaged) or, with `shard=True`, in FSDP2 (`fully_shard`
on each transformer block and on the root: every rank holds 1/N of the weights, gradients and
optimizer state). Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op and the
`Trainer` runs as a single process.

    torchrun --nproc-per-node 2 -m qkv train --corpus data/ --preset tiny-gpt2 --steps 100 --batch-size 8
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qkv.errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world_size` processes (`local_rank` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def detect() -> DistEnv:
    """This process's place: from the live process group if there is one, else from torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent (need 0 <= RANK < WORLD_SIZE)")
    return DistEnv(rank, world, _env_int("LOCAL_RANK", rank))


def init() -> DistEnv:
    """Join the process group torchrun's environment describes (no-op for one process or when joined)."""
    env = detect()
    if env.world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise UsageError(
                    f"WORLD_SIZE={env.world_size} but {name} is not set: start multi-process runs with torchrun "
                    "(or `qkv train --nproc N`), which sets it"
                )
        backend = "gloo"
        if torch.cuda.is_available():  # CPU tensors still go through gloo (qkv trains on the CPU by default)
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return env


def destroy() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True when this process is one of several in a live process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes logs, plots and checkpoints."""
    return detect().is_main


def barrier() -> None:
    if active():
        dist.barrier()


def mean(value: float) -> float:
    """`value` averaged over the ranks (itself in a single process): every rank gets the same float."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def total(value: int) -> int:
    """`value` summed over the ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. an error rank 0 found, so that all ranks raise it)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_all_ranks(obj: Any, what: str) -> None:
    """UsageError unless every rank holds an equal `obj` (e.g. the tokenizer each rank trained)."""
    if not active():
        return
    blobs = gather(pickle.dumps(obj))
    if any(b != blobs[0] for b in blobs[1:]):
        raise UsageError(f"the ranks disagree on {what}; every rank must build the same one (same files and seed)")


def seed_per_rank(env: DistEnv) -> None:
    """Give each rank its own torch RNG stream (dropout masks differ between ranks), derived from
    the current state, which every rank shares: deterministic for a given start and world size."""
    if env.world_size > 1:
        base = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        torch.manual_seed(base + env.rank)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers FSDP shards one by one: the entries of every `ModuleList` named `blocks`
    (a decoder's, an encoder's, both stacks of an encoder-decoder, ELECTRA's two encoders)."""
    found: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] == "blocks":
            found.extend(module)
    return found


def wrap(model: nn.Module, shard: bool = False) -> nn.Module:
    """The module a training step calls: `model` itself in a single process; under a process group,
    DDP around it, or with `shard=True` FSDP2 applied in place (each block, then the root), so the
    returned module is `model`. Build the optimizer after this (FSDP2 replaces the parameters)."""
    if not active():
        return model
    if shard:
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: nn.Module) -> bool:
    """True when `model` is an FSDP2 module (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_value(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it), or `x` itself."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def split_rows(batch_size: int, env: DistEnv) -> int:
    """The rows each of `env.world_size` ranks takes of a global batch of `batch_size`."""
    n = env.world_size
    if batch_size % n:
        below, above = n * (batch_size // n), n * (batch_size // n + 1)
        nearest = f"{below} or {above}" if below else str(above)
        raise UsageError(
            f"--batch-size {batch_size} is the global batch and must split evenly over {n} processes; "
            f"use a multiple of {n} (e.g. {nearest}) or another process count"
        )
    return batch_size // env.world_size
