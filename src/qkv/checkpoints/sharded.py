"""Sharded training checkpoints through `torch.distributed.checkpoint` (DCP).

A multi-process run (and a single process with `TrainingConfig.sharded_checkpoint`) saves

    run/checkpoint/
      config.json, model.safetensors, tokenizer.json   a plain native checkpoint (rank 0): what
                                                       `qkv.load`, `qkv generate` and `qkv finetune` read
      distributed/.metadata, __0_0.distcp, ...         DCP: model + optimizer state, one file per rank
                                                       (FSDP: each rank's shards; DDP: rank 0 writes all)
      training_state.pt                                step, schedule, config, and per rank: data
                                                       position, RNG states, collate state

DCP saves state dicts by parameter name (`get_state_dict` / `set_state_dict`) with each tensor's
place in the whole, so a checkpoint saved by N ranks (DDP or FSDP2) loads into M ranks (DDP,
FSDP2 or one process) and back.

Nothing half-written is ever taken for a checkpoint: every rank writes into the temporary
sibling `.checkpoint.tmp-sharded`, DCP writes its `.metadata` last, rank 0 writes
training_state.pt after all ranks are done, and only then is the directory renamed into place
(`qkv.atomic.replace_directory`). A run killed mid-save leaves the temporary directory, which
`path` never points to; the next save or resume (`recover_unfinished_saves`) removes it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkv.atomic import check_replaceable, fsync_path, replace_directory
from qkv.errors import CheckpointError

STATE_DIR = "distributed"  # DCP's directory inside the checkpoint
METADATA_FILE = ".metadata"  # written by DCP after every shard


def temp_path(path: Path) -> Path:
    """The sibling every rank writes a sharded save into before rank 0 renames it to `path`."""
    return path.with_name(f".{path.name}.tmp-sharded")


def stale_saves(path: str | os.PathLike) -> list[Path]:
    """Temporary directories of saves of `path` that never finished (a process killed mid-save)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    # `.checkpoint.tmp-*`: this module's and `atomic_directory`'s; `..checkpoint.tmp-sharded.tmp-*`: the
    # native part's own temporary directory inside a sharded save.
    return sorted({*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f"..{path.name}.tmp-*")})


def recover_unfinished_saves(path: str | os.PathLike, report: bool = False) -> list[Path]:
    """Clear what a save killed midway left next to `path` (rank 0 acts, every rank may call it)
    -> the directories removed. Temporary directories are deleted; if the kill came in the instant
    between the two renames of `replace_directory` (`path` absent, the previous checkpoint at its
    backup name), the previous checkpoint is put back. With `report`, each action is said on stderr."""
    from qkv.atomic import backup_path
    from qkv.training import distributed

    path = Path(path)
    stale = stale_saves(path)
    if not distributed.is_main():
        return stale
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
        if report:
            print(
                f"qkv: removed {tmp}, a checkpoint save that did not finish (the run stopped mid-save)", file=sys.stderr
            )
    backup = backup_path(path)
    if backup.is_dir() and not path.exists():
        os.rename(backup, path)
        if report:
            print(
                f"qkv: {path} was replaced when the run stopped; restored the previous one from {backup}",
                file=sys.stderr,
            )
    return stale


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` holds a DCP state directory (complete or not: `check_complete` says which)."""
    return (Path(path) / STATE_DIR).is_dir()


def check_complete(path: str | os.PathLike) -> None:
    """CheckpointError unless the DCP directory of `path` has its `.metadata` and every file it names."""
    state = Path(path) / STATE_DIR
    if not (state / METADATA_FILE).is_file():
        raise CheckpointError(
            f"{state} has no {METADATA_FILE}: the sharded checkpoint was not written completely (DCP writes its "
            "metadata last); resume from a complete checkpoint or start the run again"
        )
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(state)).read_metadata()
    except Exception as exc:  # a corrupt pickle raises anything
        raise CheckpointError(f"{state / METADATA_FILE} is corrupt ({type(exc).__name__}: {exc})") from None
    for entry in (metadata.storage_data or {}).values():
        file = state / entry.relative_path
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the sharded checkpoint is incomplete")
        if file.stat().st_size < entry.offset + entry.length:
            raise CheckpointError(
                f"{file} is truncated ({file.stat().st_size} bytes, the metadata needs {entry.offset + entry.length}): "
                "the sharded checkpoint is corrupt; resume from another checkpoint or start the run again"
            )


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _full(obj: Any) -> Any:
    """`obj` with every DTensor replaced by its full value (collective: every rank calls it, in order)."""
    from qkv.training.distributed import full_value

    if isinstance(obj, torch.Tensor):
        return full_value(obj).detach().clone()
    if isinstance(obj, dict):
        return {k: _full(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_full(v) for v in obj)
    return obj


def plain_copy(model: nn.Module) -> nn.Module:
    """`model` as an ordinary module holding full tensors, for the native checkpoint: itself when no
    weight is sharded; for FSDP2, a new model built from the gathered weights (every rank must call
    this; the copy is built on rank 0 only, the others get `model` back)."""
    from qkv.checkpoints.materialize import materialize, tied_aliases
    from qkv.training import distributed

    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return model
    aliases = tied_aliases(model)
    weights = {k: v for k, v in _full(model.state_dict()).items() if k not in aliases}
    if not distributed.is_main():
        return model
    copy = materialize(model.config, weights, fresh=True)
    for name in ("tokenizer", "preprocessing"):
        if getattr(model, name, None) is not None:
            setattr(copy, name, getattr(model, name))
    return copy


def save_sharded(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoint_model: nn.Module,
    shared_state: dict[str, Any],
    rank_state: dict[str, Any],
) -> Path:
    """Save a training run from every rank (all ranks call this): the native checkpoint of
    `checkpoint_model` (rank 0), `model` + `optimizer` through DCP, and training_state.pt holding
    `shared_state` and each rank's `rank_state` under "ranks". Atomic: see the module docstring."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from qkv.checkpoints.native import TRAINING_STATE_FILE, is_native_checkpoint, save_native
    from qkv.training import distributed

    path = Path(path)
    tmp = temp_path(path)
    error = None
    if distributed.is_main():
        try:
            check_replaceable(path, is_native_checkpoint, "qkv checkpoint")
            recover_unfinished_saves(path)
        except CheckpointError as exc:
            error = exc
    error = distributed.broadcast(error)
    if error is not None:
        raise error
    plain = plain_copy(checkpoint_model)  # collective for FSDP2
    extra = _full(shared_state.pop("model_extra")) if "model_extra" in shared_state else None
    if distributed.is_main():
        save_native(plain, tmp)
    distributed.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / STATE_DIR))
    ranks = _full(distributed.gather(rank_state))
    if distributed.is_main():
        state = {**shared_state, "format": "sharded", "world_size": len(ranks), "ranks": ranks}
        if extra is not None:
            state["model_extra"] = extra
        torch.save(state, tmp / TRAINING_STATE_FILE)
        for file in (*(tmp / STATE_DIR).iterdir(), *tmp.iterdir(), tmp):
            fsync_path(file)
        replace_directory(tmp, path)
    distributed.barrier()
    return path


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the DCP model + optimizer state of the checkpoint at `path` into `model` (plain, DDP's
    module or FSDP2) and `optimizer`, whatever the number of ranks that saved it (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_complete(path)
    state_dir = Path(path) / STATE_DIR
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(state_dir))
    except (dcp.api.CheckpointException, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{state_dir} cannot be loaded into this model and optimizer ({first}); "
            "it is corrupt, or was saved by another model"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
