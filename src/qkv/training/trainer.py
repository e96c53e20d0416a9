"""`Trainer`: the training loop for any model whose `forward(**batch)` takes `labels=` and returns `.loss`.

One step = `grad_accum` micro-batches (forward, backward) -> clip -> AdamW update at the scheduled
LR. Around it: eval loss/perplexity on the validation blocks, a NaN/inf guard, a tqdm bar,
`metrics.jsonl` + `loss_curve.png` in the run directory, and atomic native checkpoints whose
`training_state.pt` makes a resumed run produce the same floats as an uninterrupted one.

    loader = BlockLoader(corpus.train, batch_size=8)
    trainer = Trainer(model, TrainingConfig(steps=1000, lr=1e-3, out_dir="runs/x"), loader, corpus.val)
    trainer.train()
    # later, in a new process:
    trainer = Trainer.from_checkpoint("runs/x/checkpoint", BlockLoader(corpus.train, 8), corpus.val)
    trainer.train()

The batch comes from `collate(blocks)`; the default is the causal-LM objective. Other objectives
plug in as other collates (`MaskedLMCollator`, `classification_batch`), with an `eval_collate` for
the validation blocks and an `accuracy` that evaluation reports next to the loss. A collate with
`state_dict()` (its random generator) is saved and restored with the run. A model that trains as
more than it saves (`SavesPart`: ELECTRA's generator + discriminator) saves `checkpoint_model()`
as the checkpoint and keeps the rest in training_state.pt.

`TrainingConfig(compile=True)` runs the training step's forward and backward through
`torch.compile` (inductor fuses the norms, activations, residual adds and the loss); the first step
pays the compilation, so it is opt-in. Evaluation and checkpoints use the model as it is.

Under torchrun (`qkv.training.distributed`) the same code trains on N processes: the model is
wrapped in DDP (or FSDP2 with `shard=True`), each rank reads its share of every global batch,
loss and gradient norm are averaged so every rank logs the same numbers, only rank 0 writes
metrics, plots and progress, and checkpoints are sharded (`qkv.checkpoints.sharded`) and resume
on any number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qkv.checkpoints import sharded
from qkv.checkpoints.native import load_native, load_training_state, read_native_config, save_native
from qkv.errors import QkvError, UsageError
from qkv.training import distributed
from qkv.training.data import causal_lm_batch, iter_blocks
from qkv.training.metrics import MetricsLog
from qkv.training.optim import WarmupCosine, build_optimizer
from qkv.viz.loss_curve import plot_loss_curve

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


class NonFiniteLossError(QkvError):
    """Training produced a NaN or infinite loss or gradient; the step's update was not applied."""


class BatchSource(Protocol):
    """Where training batches come from (e.g. `BlockLoader`): endless, with a resumable position."""

    def next_batch(self) -> torch.Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class StatefulCollate(Protocol):
    """A collate that draws random numbers from a generator of its own (e.g. `MaskedLMCollator`)."""

    def __call__(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class SavesPart(Protocol):
    """A model that trains as more than it saves (ELECTRA: generator + discriminator).

    `checkpoint_model()` is what the checkpoint holds (what `qkv.load` gives back); `extra_state()`
    (plain tensors and containers) is the rest, kept in training_state.pt for an exact resume.
    """

    def checkpoint_model(self) -> nn.Module: ...
    def extra_state(self) -> dict[str, Any]: ...
    def load_extra_state(self, state: dict[str, Any]) -> None: ...


# (batch, model output) -> (correct predictions, predictions counted), summed over an evaluation.
Accuracy = Callable[[dict[str, torch.Tensor], Any], tuple[int, int]]
Collate = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class TrainingConfig:
    """Hyper-parameters of a run. `steps` counts optimizer updates (each of `grad_accum` micro-batches)."""

    steps: int
    lr: float = 3e-4
    min_lr: float | None = None  # end of the cosine; None -> lr / 10
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_accum: int = 1
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    bf16: bool = False  # autocast the forward pass to bfloat16 (weights and optimizer stay float32)
    eval_every: int = 0  # evaluate every N steps (0: only after the last step); needs validation blocks
    eval_batches: int | None = None  # cap on validation batches per evaluation (None: all)
    save_every: int = 0  # checkpoint every N steps (0: only after the last step); needs out_dir
    out_dir: str | None = None  # run directory: metrics.jsonl, loss_curve.png, checkpoint/
    progress: bool = True  # show a tqdm progress bar
    shard: bool = False  # under torchrun: FSDP2 (weights, gradients, optimizer state split over ranks), not DDP
    sharded_checkpoint: bool | None = None  # DCP checkpoints (None: when training on several processes)
    grad_checkpoint: bool = False  # recompute each block's activations in backward (less memory, more compute)
    compile: bool = False  # torch.compile (inductor) the training forward + backward; the first step compiles

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise UsageError(f"TrainingConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"TrainingConfig.{name}={getattr(self, name)} must be >= 0")
        if not self.lr > 0:
            raise UsageError(f"TrainingConfig.lr={self.lr} must be > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UsageError(f"TrainingConfig.grad_clip={self.grad_clip} must be > 0 (or None for no clipping)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- RNG state ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), Python `random` and NumPy generator states as plain tensors/containers."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains `model` on batches from `train_data`, evaluating on `val_blocks` [M, T] when given."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainingConfig,
        train_data: BatchSource,
        val_blocks: torch.Tensor | None = None,
        collate: Collate = causal_lm_batch,
        eval_batch_size: int | None = None,
        eval_collate: Collate | None = None,
        accuracy: Accuracy | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        """collate: training blocks -> batch; eval_collate: validation blocks -> batch (default:
        collate); accuracy: counted at each evaluation and logged as `eval_accuracy`; run_info:
        plain facts about the run saved with its checkpoints (e.g. the objective, checked on resume).

        Under torchrun this joins the process group, wraps the model (DDP, or FSDP2 in place when
        `config.shard`) and gives `train_data` its rank's share (`shard(rank, world_size)`).
        """
        self.dist = distributed.init()
        if self.dist.world_size > 1 and config.sharded_checkpoint is False:
            raise UsageError(
                f"sharded_checkpoint=False cannot be used on {self.dist.world_size} processes: each rank holds part "
                "of the run's state, which only a sharded checkpoint saves; leave it at None (the default)"
            )
        if self.dist.world_size > 1:
            shard = getattr(train_data, "shard", None)
            if shard is None:
                raise UsageError(
                    f"training on {self.dist.world_size} processes needs a batch source with shard(rank, world_size) "
                    f"(e.g. BlockLoader) so each rank reads its own rows; {type(train_data).__name__} has none"
                )
            shard(self.dist.rank, self.dist.world_size)
        if config.grad_checkpoint:
            from qkv.models.stack import set_grad_checkpointing

            try:
                set_grad_checkpointing(model, True)
            except ValueError as exc:
                raise UsageError(f"grad_checkpoint: {exc}") from None
        self.model = model
        self.wrapped = distributed.wrap(model, shard=config.shard)  # what a training step calls
        if config.compile:
            # Only the training step is compiled: evaluation and saving use `model` as it is, and a
            # compiled module's state dict would name every parameter `_orig_mod.<name>`.
            self.wrapped = torch.compile(self.wrapped)
        distributed.seed_per_rank(self.dist)  # after the (identical) model init on every rank
        self.run_info = dict(run_info or {})
        self.config = config
        self.train_data = train_data
        self.val_blocks = val_blocks if val_blocks is not None and len(val_blocks) else None
        self.collate = collate
        self.eval_collate = eval_collate or collate
        self.accuracy = accuracy
        self.eval_batch_size = eval_batch_size or getattr(train_data, "batch_size", 8)
        self.optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas, config.eps)
        min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
        self.schedule = WarmupCosine(config.lr, min_lr, config.warmup_steps, config.steps)
        self.step = 0  # optimizer updates done
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.metrics = MetricsLog(self.out_dir / METRICS_FILE) if self.out_dir and self.dist.is_main else None
        self.history: list[dict[str, Any]] = []  # records logged by this object (train and eval)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_DIR if self.out_dir else None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self._device().type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _batch(self, blocks: torch.Tensor, collate: Collate | None = None) -> dict[str, torch.Tensor]:
        device = self._device()
        return {k: v.to(device) for k, v in (collate or self.collate)(blocks).items()}

    @property
    def sharded_checkpoint(self) -> bool:
        """Whether `save()` writes a DCP checkpoint (config.sharded_checkpoint; default: when distributed)."""
        flag = self.config.sharded_checkpoint
        return self.dist.world_size > 1 if flag is None else flag

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.metrics is not None:
            self.metrics.append(record)

    # -- the loop --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer update over `grad_accum` micro-batches -> its metrics record."""
        cfg, model = self.config, self.wrapped
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float32)
        tokens = 0
        for _ in range(cfg.grad_accum):
            batch = self._batch(self.train_data.next_batch())
            tokens += batch["input_ids"].numel() if "input_ids" in batch else 0
            with self._autocast():
                loss = model(**batch).loss
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float().cpu()
        loss_value = distributed.mean(loss_sum.item() / cfg.grad_accum)  # every rank logs the global mean
        tokens = distributed.total(tokens)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # max_norm=inf measures the norm without changing the gradients. The gradients are already
        # averaged over ranks (DDP) or sharded (FSDP2: the norm is a DTensor over all shards).
        grad_norm = float(distributed.full_value(nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {grad_norm}"
            raise NonFiniteLossError(
                f"training stopped at step {self.step + 1}: the {what} (loss {loss_value:.6g}, lr {lr:.3g}); "
                "the update was not applied. Lower the learning rate, clip gradients (grad_clip), or resume "
                "from the last checkpoint"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - start
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}  # fmt: skip

    def train(self, until: int | None = None) -> list[dict[str, Any]]:
        """Run from the current step to `config.steps` (or stop after step `until`) -> this call's records.

        `until` pauses a run early; the schedule still ends at `config.steps`.
        """
        cfg = self.config
        stop = cfg.steps if until is None else min(until, cfg.steps)
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)  # records past a resumed checkpoint are about to be redone
        first = len(self.history)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.dist.is_main), unit="step",
                   dynamic_ncols=True)  # fmt: skip
        try:
            while self.step < stop:
                record = self.train_step()
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)  # fmt: skip
                bar.update(1)
                last = self.step == cfg.steps
                if self.val_blocks is not None and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                    self._log(self.evaluate())
                    if self.dist.is_main:
                        bar.write(describe_eval(self.history[-1]))
                    self.plot()
                if self.out_dir and (last or (cfg.save_every and self.step % cfg.save_every == 0)):
                    self.save()
        finally:
            bar.close()
            self.plot()
        return self.history[first:]

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss and perplexity (exp of the mean loss) over the validation blocks, and the
        accuracy when the trainer has an `accuracy` counter."""
        if self.val_blocks is None:
            raise UsageError("evaluate() needs validation blocks (val_blocks)")
        was_training = self.model.training
        self.model.eval()
        total, count, correct, counted = 0.0, 0, 0, 0
        for i, blocks in enumerate(iter_blocks(self.val_blocks, self.eval_batch_size)):
            if self.config.eval_batches is not None and i >= self.config.eval_batches:
                break
            batch = self._batch(blocks, self.eval_collate)
            with self._autocast():
                out = self.model(**batch)
            total += out.loss.float().item() * len(blocks)
            count += len(blocks)
            if self.accuracy is not None:
                right, n = self.accuracy(batch, out)
                correct, counted = correct + right, counted + n
        self.model.train(was_training)
        mean = total / count
        record = {"step": self.step, "eval_loss": mean, "eval_ppl": math.exp(mean) if mean < 700 else math.inf}
        if self.accuracy is not None:
            record["eval_accuracy"] = correct / counted if counted else math.nan
        return record

    def plot(self) -> Path | None:
        """Redraw loss_curve.png in the run directory from metrics.jsonl (no-op without out_dir)."""
        if self.out_dir is None or self.metrics is None:
            return None
        records = self.metrics.read()
        return plot_loss_curve(records, self.out_dir / LOSS_CURVE_FILE) if records else None

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that an exact resume needs (plain tensors and containers)."""
        state = {**self._shared_state(), "optimizer": self.optimizer.state_dict(), **self._rank_state()}
        if isinstance(self.model, SavesPart):
            state["model_extra"] = self.model.extra_state()
        return state

    def _shared_state(self) -> dict[str, Any]:
        """The state every rank holds alike: step, schedule, the run's and the model's config."""
        model = self.model.checkpoint_model() if isinstance(self.model, SavesPart) else self.model
        config = getattr(model, "config", None)
        state = {
            "step": self.step,
            "schedule": dataclasses.asdict(self.schedule),
            "training_config": self.config.to_dict(),
            "run_info": self.run_info,
        }
        if config is not None and hasattr(config, "to_dict"):
            state["model_config"] = config.to_dict()
        return state

    def _rank_state(self) -> dict[str, Any]:
        """The state of this rank's own: data position, RNG states, the collate's generator."""
        state = {"data": self.train_data.state_dict(), "rng": rng_state()}
        if isinstance(self.collate, StatefulCollate):
            state["collate"] = self.collate.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], path: str | os.PathLike | None = None) -> None:
        """Continue from `state_dict()` output; the model must already hold the checkpoint's weights
        (for a `SavesPart` model: its checkpoint part; the rest comes back from `state`). A sharded
        checkpoint's state (format "sharded") loads the model and optimizer from `path`'s DCP files."""
        if state.get("format") == "sharded":
            if path is None:
                raise UsageError("loading a sharded training state needs the checkpoint's path")
            sharded.load_sharded(path, self.model, self.optimizer)
            state = {**state, **self._my_rank_state(state)}
        else:
            if isinstance(self.model, SavesPart) and "model_extra" in state:
                self.model.load_extra_state(state["model_extra"])
            if distributed.active() and distributed.is_sharded(self.model):
                self._load_full_optimizer_state(state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
        self.train_data.load_state_dict(state["data"])
        if isinstance(self.collate, StatefulCollate) and "collate" in state:
            self.collate.load_state_dict(state["collate"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])

    def _load_full_optimizer_state(self, saved: dict[str, Any]) -> None:
        """Load a single process's `optimizer.state_dict()` (parameters by index) into the optimizer of
        an FSDP2 model, each rank taking its shards: the indices become parameter names (both
        optimizers list the parameters in the model's order) and DCP's helper splits the tensors."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): name for name, p in self.model.named_parameters()}
        order = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        if len(order) != sum(len(g["params"]) for g in saved["param_groups"]):
            raise UsageError("the checkpoint's optimizer state does not match this model's parameters")
        by_name = {
            "state": {order[i]: value for i, value in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
        }
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=options)

    def _my_rank_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of a sharded checkpoint's per-rank states. On the world size that saved it,
        its own; on another, rank 0's RNG (split per rank), and the data position and collate state,
        which must then be the same on every saved rank (a `BlockLoader`'s position is world-size
        independent)."""
        ranks = state["ranks"]
        if len(ranks) == self.dist.world_size:
            return ranks[self.dist.rank]
        if self.dist.world_size > 1:  # rank 0's saved RNG, split into one stream per rank as at the start
            set_rng_state(ranks[0]["rng"])
            distributed.seed_per_rank(self.dist)
            ranks = [{**r, "rng": rng_state()} for r in ranks]
        for key in ("data", "collate"):
            values = [r.get(key) for r in ranks]
            if any(not _equal(v, values[0]) for v in values[1:]):
                raise UsageError(
                    f"the checkpoint was saved by {len(ranks)} processes whose {key} states differ, so it cannot be "
                    f"resumed on {self.dist.world_size}; resume it with --nproc {len(ranks)}"
                )
        return ranks[0]

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write model + training state (default: <out_dir>/checkpoint). Every rank calls it: a
        native checkpoint (one process), or a sharded one (`qkv.checkpoints.sharded`), which holds
        a native checkpoint of the model too."""
        path = path or self.checkpoint_path
        if path is None:
            raise UsageError("save() needs a path, or TrainingConfig.out_dir to save into")
        model = self.model.checkpoint_model() if isinstance(self.model, SavesPart) else self.model
        if self.sharded_checkpoint:
            shared = self._shared_state()
            if isinstance(self.model, SavesPart):
                shared["model_extra"] = self.model.extra_state()
            return sharded.save_sharded(path, self.model, self.optimizer, model, shared, self._rank_state())
        return save_native(model, path, training_state=self.state_dict())

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        train_data: BatchSource,
        val_blocks: torch.Tensor | None = None,
        collate: Collate = causal_lm_batch,
        config: TrainingConfig | None = None,
        model: nn.Module | None = None,
        **options: Any,
    ) -> Trainer:
        """A trainer that continues the run saved at `path`: model, optimizer, RNG and data position.

        config: None keeps the saved one (pass a changed copy to, e.g., train for more steps);
        model: the checkpoint's model if already loaded (default: `load_native(path)`); it must have
        the saved model config; options: the other `Trainer` arguments (eval_collate, accuracy,
        eval_batch_size). A sharded checkpoint resumes on any number of processes (every rank
        calls this); unfinished saves left next to `path` are removed and reported.
        """
        sharded.recover_unfinished_saves(path, report=True)
        state = load_training_state(path)
        if state.get("format") == "sharded":
            sharded.check_complete(path)
        config = config or TrainingConfig(**state["training_config"])
        model = model if model is not None else load_native(path)
        check_same_model(path, model)
        trainer = cls(model, config, train_data, val_blocks, collate, **options)
        trainer.load_state_dict(state, path)
        return trainer


def check_same_model(path: str | os.PathLike, model: nn.Module) -> None:
    """UsageError naming the differing fields unless `model` has the config saved at `path`."""
    part = model.checkpoint_model() if isinstance(model, SavesPart) else model
    mine = getattr(part, "config", None)
    if mine is None or not hasattr(mine, "to_dict"):
        return
    saved, ours = read_native_config(path).to_dict(), mine.to_dict()
    differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if differ:
        shown = ", ".join(f"{k}: saved {saved.get(k)!r}, given {ours.get(k)!r}" for k in differ[:6])
        raise UsageError(
            f"cannot resume {path} with a different model config ({shown}); resume with the model (preset) the run "
            "was started with, or start a new run"
        )


def _equal(a: Any, b: Any) -> bool:
    """Deep equality of plain containers holding tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def describe_eval(record: dict[str, Any]) -> str:
    """One line for an evaluation record: loss, and accuracy when counted, else perplexity."""
    line = f"step {record['step']}: eval loss {record['eval_loss']:.4f}"
    if "eval_accuracy" in record:
        return f"{line}, accuracy {record['eval_accuracy']:.4f}"
    return f"{line}, perplexity {record['eval_ppl']:.2f}"
