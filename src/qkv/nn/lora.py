"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models"), and QLoRA-style adapters on packed int4/int8 weights (Dettmers et al. 2023).

A wrapped layer computes y = base(x) + (alpha / r) * B A dropout(x), with A [r, in] and B [out, r]
trainable and the base frozen. As in PEFT: A starts kaiming-uniform (a = sqrt(5)), B starts at zero
(so a fresh adapter changes nothing), dropout acts on the adapter's input only, and the adapter's
weights are float32 whatever the base's dtype. The scaling is alpha / r, or alpha / sqrt(r) with
`rslora=True` (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").

Fused projections. qkv keeps q/k/v in one `qkv_proj` (and a gated MLP's gate/up in one `up`). Each
slice of such a layer gets a low-rank pair of its own, so an adapter maps one for one onto Hugging
Face's separate `q_proj`/`k_proj`/`v_proj` (`gate_proj`/`up_proj`) and PEFT loads it. Where Hugging
Face fuses the projection too (GPT-2's `c_attn`), the layer gets one pair, as PEFT gives it.

Targets are name patterns (`LoraConfig.targets`), matched against each layer's parts:
- a role: "q", "k", "v" (the slices of `qkv_proj`, and cross-attention's `q_proj` / `kv_proj`
  slices), "o" (the attention output projection), "gate", "up", "down" (the MLP's);
- a module name or a dotted suffix of it ("o_proj", "blocks.0.attn.qkv_proj", "lm_head"), which
  takes every slice of that layer; a slice's own name is the module's plus its role
  ("blocks.0.attn.qkv_proj.q"). A role wins over a module of the same name: "up" is the up half
  of a gated MLP's fused `up`, "mlp.up" all of it;
- a glob over those names ("blocks.1*.attn.*", "*.mlp.down").

Saving, loading and PEFT's format are in `qkv.checkpoints.peft`; this module re-exports them.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qkv.errors import UsageError
from qkv.nn.attention import Attention
from qkv.nn.linear import Linear
from qkv.nn.mlp import MLP
from qkv.nn.quant import QuantLinear

__all__ = [
    "DEFAULT_TARGETS",
    "LoraConfig",
    "LoraLinear",
    "LoraSlice",
    "apply_lora",
    "load_adapter",
    "lora_layers",
    "lora_parameters",
    "lora_sites",
    "merge_lora",
    "save_adapter",
]

DEFAULT_TARGETS = ("q", "k", "v", "o")  # the attention projections, as in the LoRA paper's §7.1


@dataclass(frozen=True)
class LoraConfig:
    """rank r of each low-rank pair; alpha: the update is scaled by alpha / r (alpha / sqrt(r) with
    rslora); dropout on the adapter's input, in [0, 1); targets: name patterns (see the module doc)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UsageError(f"LoRA rank must be a positive integer, got {self.rank!r} (e.g. rank=8)")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise UsageError(
                f"LoRA alpha must be a positive number, got {self.alpha!r} (e.g. alpha=16, twice the rank)"
            )
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise UsageError(f"LoRA dropout must be in [0, 1), got {self.dropout!r} (e.g. dropout=0.05)")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise UsageError(f"LoRA targets must be non-empty name patterns, got {self.targets!r} (e.g. ('q', 'v'))")

    @property
    def scaling(self) -> float:
        """The factor on B A x: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True)
class LoraSlice:
    """Output rows [start, start + size) of a layer, which one low-rank pair updates. `name` is the
    role of the slice in a fused layer ("q", "gate", ...), or "" for the whole layer."""

    name: str
    start: int
    size: int


@dataclass(frozen=True)
class LoraSite:
    """A linear layer LoRA can wrap: its module name, its `role` when it has one ("o", "down", ...;
    "" otherwise) and its slices (one for a plain layer; q/k/v for a fused `qkv_proj`)."""

    module: str
    role: str
    parts: tuple[LoraSlice, ...]

    def part_name(self, part: LoraSlice) -> str:
        return f"{self.module}.{part.name}" if len(self.parts) > 1 else self.module


def _parts(parent: nn.Module, child: str, layer: nn.Module) -> tuple[str, tuple[LoraSlice, ...]]:
    """The role of `parent.child` and its slices, from the part it plays in an Attention or MLP."""
    out = layer.out_features
    roles: tuple[str, ...] = ()
    sizes: tuple[int, ...] = (out,)
    role = ""
    if isinstance(parent, Attention):
        q, kv = parent.n_heads * parent.head_dim, parent.n_kv_heads * parent.head_dim
        role = {"q_proj": "q", "o_proj": "o"}.get(child, "")
        if child == "qkv_proj":
            roles, sizes = ("q", "k", "v"), (q, kv, kv)
        elif child == "kv_proj":
            roles, sizes = ("k", "v"), (kv, kv)
    elif isinstance(parent, MLP):
        role = {"up": "up", "down": "down"}.get(child, "")
        if child == "up" and parent.gated:
            roles, sizes = ("gate", "up"), (parent.d_ff, parent.d_ff)
    if not roles:
        return role, (LoraSlice("", 0, out),)
    role = ""  # a fused layer's roles are its slices' ("up" is the up half of a gated `up`, not all of it)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return role, tuple(LoraSlice(r, s, n) for r, s, n in zip(roles, starts, sizes, strict=True))


def lora_sites(model: nn.Module) -> list[LoraSite]:
    """Every linear layer of `model` (dense or quantized) that LoRA can wrap, with its slices."""
    sites = []
    wrapped = {f"{name}.base" for name in lora_layers(model)}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLinear):
            layer = layer.base
        elif not isinstance(layer, nn.Linear | QuantLinear) or name in wrapped:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        role, parts = _parts(parent, child, layer)
        sites.append(LoraSite(name, role, parts))
    return sites


def _matches(pattern: str, name: str, role: str) -> bool:
    if pattern in (role, name) or name.endswith("." + pattern):
        return True
    return any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern)


def _select(site: LoraSite, patterns: tuple[str, ...]) -> tuple[LoraSlice, ...]:
    """The slices of `site` that some pattern names (all of them when one names the module)."""
    roles = {part.name for part in site.parts}  # a role wins over a module name: "up" is a gated `up`'s up half
    if any(p not in roles and _matches(p, site.module, site.role) for p in patterns):
        return site.parts
    if len(site.parts) == 1:
        return ()
    return tuple(part for part in site.parts if any(_matches(p, site.part_name(part), part.name) for p in patterns))


class _FrozenQuantLinear(torch.autograd.Function):
    """base(x) for a frozen `QuantLinear`: forward on the packed weight, backward dx = dy W with W
    dequantized again, never kept. Autograd through `F.linear` would keep each layer's dense weight
    for the backward pass, which is the memory QLoRA exists to save."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # `_dense_weight` equals `dequantize` bit for bit and, once the packed kernel form is built
        # (bfloat16), decodes it directly (qkv's C kernel) instead of unpacking it back to the stored form
        return grad @ ctx.layer._dense_weight(grad.dtype), None  # [..., out] @ [out, in]


class LoraLinear(nn.Module):
    """A frozen `base` (Linear or QuantLinear) plus one low-rank pair per slice in `slices`.

    lora_A: [len(slices) * r, in] (slice i's A is rows i*r .. (i+1)*r); lora_B: [sum of the slices'
    sizes, r] (slice i's B is its rows, in order). x: [..., in] -> [..., out].
    """

    def __init__(self, base: nn.Module, slices: tuple[LoraSlice, ...], config: LoraConfig,
                 parts: tuple[str, ...] = ()) -> None:  # fmt: skip
        super().__init__()
        self.base = base
        self.slices = tuple(slices)
        self.parts = parts  # the roles of the base's slices, in order ("q", "k", "v"); () when not fused
        self.rank, self.alpha, self.rslora = config.rank, config.alpha, config.rslora
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # a packed QuantLinear's stored `qweight` is an empty meta placeholder: take a tensor that holds data
        device = next(t.device for t in (*base.parameters(), *base.buffers()) if not t.is_meta)
        n, r = len(self.slices), config.rank
        self.lora_A = nn.Parameter(torch.empty(n * r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(sum(s.size for s in self.slices), r, device=device))
        for i in range(n):  # PEFT's init of each slice's A on its own [r, in] (same bound: fan_in = in)
            nn.init.kaiming_uniform_(self.lora_A.data[i * r : (i + 1) * r], a=math.sqrt(5))
        self.train(base.training)  # a wrapper added to a model in eval mode is in eval mode (no dropout)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        names = ",".join(s.name or "all" for s in self.slices)
        return f"rank={self.rank}, alpha={self.alpha}, slices={names}"

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice i's (A [r, in], B [size, r])."""
        r, rows = self.rank, sum(s.size for s in self.slices[:i])
        return self.lora_A[i * r : (i + 1) * r], self.lora_B[rows : rows + self.slices[i].size]

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A laid over the base's rows: [out, in], float32, zero on rows no slice covers."""
        delta = torch.zeros(self.out_features, self.in_features, dtype=self.lora_A.dtype, device=self.lora_A.device)
        for i, s in enumerate(self.slices):
            A, B = self.pair(i)
            delta[s.start : s.start + s.size] = (B @ A) * self.scaling
        return delta

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, QuantLinear) and torch.is_grad_enabled() and x.requires_grad:
            return _FrozenQuantLinear.apply(x, self.base)
        return self.base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        h = x.to(self.lora_A.dtype)
        n, r = len(self.slices), self.rank
        if n > 1 and isinstance(self.dropout, nn.Dropout) and self.training:
            a = torch.cat([F.linear(self.dropout(h), self.pair(i)[0]) for i in range(n)], dim=-1)  # own masks
        else:
            a = F.linear(self.dropout(h), self.lora_A)  # [..., n * r]: every slice's A in one matmul
        if n == 1:
            delta = F.linear(a, self.lora_B)
        else:
            delta = torch.cat([F.linear(a[..., i * r : (i + 1) * r], self.pair(i)[1]) for i in range(n)], dim=-1)
        delta = delta * self.scaling
        first, last = self.slices[0].start, self.slices[-1].start + self.slices[-1].size
        if last - first == delta.shape[-1] and first == 0 and last == self.out_features:
            return (y + delta).to(y.dtype)
        # some slices only (q and v of a fused qkv_proj): scatter their rows into a zero update
        full = delta.new_zeros(*delta.shape[:-1], self.out_features)
        rows = 0
        for s in self.slices:
            full[..., s.start : s.start + s.size] = delta[..., rows : rows + s.size]
            rows += s.size
        return (y + full).to(y.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """{module name: LoraLinear} for every wrapped layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable parameters (every lora_A and lora_B), for the optimizer."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _whole_in_hf(model: nn.Module) -> set[str]:
    """Fused layers that Hugging Face fuses too (GPT-2's c_attn): they take one pair, not one per slice."""
    from qkv.checkpoints.peft import hf_fused_layers  # the layout is the checkpoint format's business

    return hf_fused_layers(model)


def apply_lora(model: nn.Module, config: LoraConfig | None = None) -> list[str]:
    """Wrap the layers `config.targets` names in `LoraLinear`s, in place, and freeze every other
    parameter of `model` (QuantLinear bases are buffers: frozen anyway). Returns the names of the
    parts wrapped ("blocks.0.attn.qkv_proj.q", ..., "blocks.0.attn.o_proj").

    Raises UsageError for a pattern that matches no layer (naming it and listing real names), and
    for a model that already has LoRA layers (merge or remove them first)."""
    config = config or LoraConfig()
    if lora_layers(model):
        raise UsageError("the model already has LoRA layers; merge_lora(model) first, or load a fresh model")
    sites = lora_sites(model)
    chosen = _choose(model, sites, config.targets)
    return _wrap(model, chosen, config)


def _choose(model: nn.Module, sites: list[LoraSite], patterns: tuple[str, ...]) -> dict[str, tuple]:
    """{module name: (site, slices)} for the targets; errors for patterns that match nothing."""
    for pattern in patterns:
        if not any(_select(site, (pattern,)) for site in sites):
            examples = [site.part_name(p) for site in sites for p in site.parts]
            roles = sorted({p.name for site in sites for p in site.parts if p.name} | {s.role for s in sites if s.role})
            raise UsageError(
                f"LoRA target {pattern!r} matches no linear layer of this model; roles: {', '.join(roles) or 'none'}; "
                f"layers include {', '.join(examples[:6])}{' ...' if len(examples) > 6 else ''}"
            )
    whole = _whole_in_hf(model)
    chosen = {}
    for site in sites:
        slices = _select(site, patterns)
        if not slices:
            continue
        if site.module in whole and len(site.parts) > 1:
            if len(slices) != len(site.parts):
                raise UsageError(
                    f"{site.module} is one fused layer in this model's Hugging Face form too, so its adapter is one "
                    f"pair over all of {'/'.join(p.name for p in site.parts)}; target them all (or the module name), "
                    f"not only {'/'.join(s.name for s in slices)}"
                )
            slices = (LoraSlice("", 0, sum(p.size for p in site.parts)),)
        chosen[site.module] = (site, slices)
    return chosen


def _wrap(model: nn.Module, chosen: dict[str, tuple], config: LoraConfig) -> list[str]:
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for module, (site, slices) in chosen.items():
        base = model.get_submodule(module)
        parts = tuple(p.name for p in site.parts) if len(site.parts) > 1 else ()
        _set_module(model, module, LoraLinear(base, slices, config, parts))
        names += [f"{module}.{s.name}" if s.name and parts else module for s in slices]
    return names


def apply_lora_parts(model: nn.Module, parts: dict[str, tuple[str, ...]], config: LoraConfig) -> list[str]:
    """Wrap exactly the given parts ({module name: slice names, () for the whole layer}): what an
    adapter file holds (`load_adapter`). Names that are not layers of `model` raise UsageError."""
    sites = {site.module: site for site in lora_sites(model)}
    chosen = {}
    for module, names in parts.items():
        site = sites.get(module)
        if site is None:
            raise UsageError(f"{module} is not a linear layer of this model")
        if not names:
            slices = (LoraSlice("", 0, sum(p.size for p in site.parts)),)
        else:
            by_name = {p.name: p for p in site.parts}
            slices = tuple(by_name[n] for n in sorted(names, key=[p.name for p in site.parts].index))
        chosen[module] = (site, slices)
    return _wrap(model, chosen, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + scaling * B A) and put the base back in place
    of the wrapper; returns the model, whose state dict is a plain checkpoint's again.

    A `QuantLinear` base becomes a dense `Linear` (dequantized weight + update, in the dtype of the
    model's other weights): the merged weights are no longer on the int4/int8 grid. Quantize the
    result again (`qkv.nn.quant.quantize_model`) to get a packed model. A base whose weight is
    shared (an LM head tied to the embeddings) gets a weight of its own, and the config says
    `tie_embeddings=False`. Parameters stay frozen (requires_grad False)."""
    layers = lora_layers(model)
    if not layers:
        return model
    dtype = next((p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point()),
                 torch.float32)  # fmt: skip
    untied = False
    with torch.no_grad():
        for name, layer in layers.items():
            base, delta = layer.base, layer.delta_weight()
            if isinstance(base, QuantLinear):
                dense = Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
                dense.weight = nn.Parameter(base.dequantize(torch.float32).add_(delta).to(dtype), requires_grad=False)
                if base.bias is not None:
                    dense.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
                base = dense
            else:
                shared = any(p is base.weight for n, p in model.named_parameters(remove_duplicate=False)
                             if not n.startswith(name + "."))  # fmt: skip
                merged = (base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype)
                if shared:
                    base.weight = nn.Parameter(merged, requires_grad=False)
                    untied = True
                else:
                    base.weight.copy_(merged)
            _set_module(model, name, base)
    cfg = getattr(model, "config", None)
    if untied and getattr(cfg, "tie_embeddings", False):
        model.config = cfg.replace(tie_embeddings=False)
    return model


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter alone as a PEFT directory (adapter_config.json + adapter_model.safetensors),
    atomically; `peft.PeftModel.from_pretrained(hf_model, path)` loads it. See `qkv.checkpoints.peft`."""
    from qkv.checkpoints.peft import save_adapter as save

    return save(model, path, base_model_name_or_path)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a PEFT LoRA adapter directory onto `model` (applying LoRA where it is not yet applied);
    returns the parts loaded. See `qkv.checkpoints.peft`."""
    from qkv.checkpoints.peft import load_adapter as load

    return load(model, path)
