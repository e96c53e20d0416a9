"""AdamW with decay only where it belongs, and the warmup + cosine learning-rate schedule.

Weight decay (decoupled, Loshchilov & Hutter 2019) shrinks matrices toward zero; applied to norm
gains, biases or embedding rows it only hurts, so those go in a group with `weight_decay=0`
(the GPT-2/nanoGPT/LLaMA convention).

The update runs as torch's fused AdamW kernel where it can: one pass over each parameter and its
two moments instead of a dozen foreach passes (`python benchmarks/train.py --optimizer` times both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qkv.nn.norm import RMSNorm

# Modules whose parameters never get weight decay.
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    RMSNorm,
)


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names (first name of each tied parameter) -> (decayed, not decayed).

    Not decayed: parameters of embeddings and norms, biases, and any other parameter with fewer
    than 2 dimensions. A tied parameter (e.g. the LM head sharing the token embedding) is not
    decayed if any module that holds it is an embedding or a norm.
    """
    first_name: dict[int, str] = {}
    exempt: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            first_name.setdefault(id(param), full)
            if isinstance(module, NO_DECAY_MODULES) or name == "bias" or param.dim() < 2:
                exempt.add(id(param))
    decay = [n for i, n in first_name.items() if i not in exempt]
    no_decay = [n for i, n in first_name.items() if i in exempt]
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: [{"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0}].

    Only trainable parameters are included; empty groups are left out. The order is the model's
    registration order, so a checkpointed optimizer state lines up with a rebuilt model.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay, no_decay = split_decay(model)
    groups = [
        {"params": [params[n] for n in decay if n in params], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay if n in params], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes every one of `params`: plain floating-point tensors
    on a device it has the kernel for. Sharded parameters (DTensor, FSDP2) take the foreach path."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in devices for p in params
    )


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`. The LR is set each step by the schedule.

    fused: torch's fused kernel (None: wherever `fused_supported` says it runs; False: the
    foreach implementation). Both compute the same update, to float32 rounding.
    """
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = fused_supported([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup to `max_lr`, then cosine decay to `min_lr` at `total_steps`, then flat.

    `step` counts completed optimizer updates (0 for the first). Warmup: Goyal et al. 2017;
    cosine: Loshchilov & Hutter 2017 (SGDR without restarts).

        >>> s = WarmupCosine(max_lr=1.0, min_lr=0.1, warmup_steps=2, total_steps=12)
        >>> [round(s(i), 3) for i in (0, 1, 2, 7, 12, 20)]
        [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]
    """

    max_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.max_lr - self.min_lr)
