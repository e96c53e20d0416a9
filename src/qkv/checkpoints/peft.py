"""LoRA adapters in PEFT's format, in and out: a directory the `peft` package reads and writes.

    adapter/
      adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout",
                                   "target_modules" (Hugging Face module names), "task_type",
                                   "base_model_name_or_path", "bias": "none", "use_rslora", ...}
      adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight  [r, in]
                                  base_model.model.<HF module>.lora_B.weight  [out, r]  (float32)

The HF module names come from the same key maps that load Hugging Face checkpoints
(`qkv.checkpoints.keymaps`): qkv's fused `qkv_proj` is LLaMA's q_proj/k_proj/v_proj, and each
slice's pair (`qkv.nn.lora`) is saved under its own module; GPT-2's `c_attn` is fused in HF too
and holds one pair. So `peft.PeftModel.from_pretrained(hf_model, adapter)` gives the logits qkv
gives, and an adapter PEFT trained loads onto the qkv model (tests/checkpoints/test_peft.py).
What PEFT can write and qkv does not implement (DoRA, per-layer ranks, trained biases,
modules_to_save, embedding or convolution adapters) is refused by name, never dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qkv.atomic import atomic_directory, check_replaceable
from qkv.checkpoints.convert import expand_rules
from qkv.checkpoints.hf import _depths, hf_keymap
from qkv.checkpoints.hf_config import hf_model_type
from qkv.checkpoints.keymaps import KeyRule
from qkv.errors import CheckpointError, UsageError
from qkv.formats.jsonfile import read_json
from qkv.formats.safetensors import SafetensorsFile, save_safetensors
from qkv.models.vision import CLIPConfig
from qkv.nn.lora import LoraConfig, apply_lora_parts, lora_layers, lora_sites

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "hf_fused_layers", "is_adapter_dir", "load_adapter", "save_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
TASK_TYPES = {"decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION"}


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A directory holding an adapter_config.json."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _layout(model: nn.Module) -> tuple[str, dict[str, KeyRule]]:
    """(HF model_type, {qkv module name: its weight's key rule}) for `model`'s Hugging Face form: the
    one it was loaded from when it came from a Hugging Face directory, else the one export would write."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UsageError(f"a {type(model).__name__} without a qkv .config has no Hugging Face form for an adapter")
    extra = getattr(cfg, "extra", None) or {}
    try:
        model_type = "clip" if isinstance(cfg, CLIPConfig) else extra.get("hf_model_type") or hf_model_type(cfg)
        rules = hf_keymap(cfg, model_type, extra.get("hf_architecture"))
    except (CheckpointError, KeyError) as exc:
        raise UsageError(f"this model has no Hugging Face form, so no PEFT adapter names its modules ({exc})") from None
    rules = expand_rules(rules, *_depths(cfg))
    by_module = {r.target.removesuffix(".weight"): r for r in rules if r.target.endswith(".weight")}
    return model_type, {m: r for m, r in by_module.items() if all(s.endswith(".weight") for s in r.sources)}


def hf_fused_layers(model: nn.Module) -> set[str]:
    """qkv modules whose weight is one tensor in the Hugging Face form too (GPT-2's c_attn); empty
    for a model without one (its fused layers then take a pair per slice)."""
    try:
        _, rules = _layout(model)
    except UsageError:
        return set()
    return {module for module, rule in rules.items() if len(rule.sources) == 1}


def _hf_names(module: str, rule: KeyRule, parts: tuple[str, ...]) -> dict[str, str]:
    """{slice name ("" = the whole layer): HF module name} for one qkv module."""
    sources = [s.removesuffix(".weight") for s in rule.sources]
    if len(sources) == 1:
        return {"": sources[0]}
    if len(sources) != len(parts):
        raise UsageError(f"{module}: {len(parts)} slices in qkv but {len(sources)} modules in Hugging Face's form")
    return dict(zip(parts, sources, strict=True))


def _target_modules(targeted: set[str], every: set[str]) -> list[str]:
    """PEFT's target_modules: the leaf names ("q_proj") when they name exactly the targeted modules,
    else the full names (PEFT matches a name or a dotted suffix of one)."""
    leaves = {name.rpartition(".")[2] for name in targeted}
    if {name for name in every if name.rpartition(".")[2] in leaves} == targeted:
        return sorted(leaves)
    return sorted(targeted)


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s LoRA layers as a PEFT adapter directory at `path`, atomically.

    base_model_name_or_path: recorded in adapter_config.json for PEFT (a hub id or a directory).
    An existing adapter directory (or empty directory) at `path` is replaced; anything else is refused.
    """
    layers = lora_layers(model)
    if not layers:
        raise UsageError("the model has no LoRA layers to save; apply_lora(model, config) first")
    _, rules = _layout(model)
    first = next(iter(layers.values()))
    tensors: dict[str, torch.Tensor] = {}
    conv1d = False
    for name, layer in layers.items():
        if (layer.rank, layer.alpha, layer.rslora) != (first.rank, first.alpha, first.rslora):
            raise UsageError(f"{name} has another LoRA rank or alpha than the others; PEFT's format holds one of each")
        rule = rules.get(name)
        if rule is None or rule.transform not in ("none", "transpose"):
            raise UsageError(f"{name} has no Hugging Face linear module for a PEFT adapter; do not target it")
        conv1d |= rule.transform == "transpose"  # GPT-2's Conv1D: PEFT records fan_in_fan_out
        names = _hf_names(name, rule, layer.parts)
        for i, part in enumerate(layer.slices):
            if part.name not in names:
                raise UsageError(f"{name}.{part.name}: Hugging Face fuses this layer; an adapter must cover all of it")
            A, B = layer.pair(i)
            tensors[f"{PREFIX}{names[part.name]}.lora_A.weight"] = A.detach().float().cpu().contiguous()
            tensors[f"{PREFIX}{names[part.name]}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    targeted = {key[len(PREFIX) :].rpartition(".lora_")[0] for key in tensors}
    every = {s.removesuffix(".weight") for r in rules.values() for s in r.sources}
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(getattr(model.config, "family", "")),
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "use_rslora": first.rslora,
        "target_modules": _target_modules(targeted, every),
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "auto_mapping": None,
        "revision": None,
    }
    path = Path(path)
    check_replaceable(path, is_adapter_dir, "PEFT adapter")
    with atomic_directory(path) as tmp:
        save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


# adapter_config.json fields that change what the adapter computes, with the value qkv implements.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA"),
    "lora_bias": (False, "trained LoRA biases"),
    "rank_pattern": ({}, "per-layer ranks"),
    "alpha_pattern": ({}, "per-layer alphas"),
    "modules_to_save": (None, "fully trained extra modules (modules_to_save)"),
    "layers_to_transform": (None, "layers_to_transform"),
    "trainable_token_indices": (None, "trainable tokens"),
    "layer_replication": (None, "layer replication"),
    "target_parameters": (None, "adapters on parameters (target_parameters)"),
}


def read_adapter_config(path: Path) -> LoraConfig:
    """The LoraConfig an adapter directory's adapter_config.json describes (targets: its target_modules)."""
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(
            f"{path}: no {ADAPTER_CONFIG}; a PEFT adapter directory holds one (peft's save_pretrained)"
        )
    raw = read_json(file, "PEFT adapter config")
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{file}: peft_type is {got!r}; qkv loads LoRA adapters (peft_type 'LORA') only")
    for key, (plain, what) in _UNSUPPORTED.items():
        value = raw.get(key, plain)
        if value not in (plain, None, False, {}, []):
            raise CheckpointError(f"{file}: {key}={value!r}; qkv's LoRA does not implement {what}")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: bias={raw['bias']!r}; qkv's LoRA trains no biases (bias 'none')")
    targets = raw.get("target_modules") or ("?",)
    try:
        return LoraConfig(rank=raw.get("r"), alpha=raw.get("lora_alpha"), dropout=raw.get("lora_dropout", 0.0),
                          targets=(targets,) if isinstance(targets, str) else tuple(targets),
                          rslora=bool(raw.get("use_rslora", False)))  # fmt: skip
    except UsageError as exc:
        raise CheckpointError(f"{file}: {exc}") from None


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load the PEFT LoRA adapter at `path` onto `model`: LoRA is applied on exactly the modules the
    adapter holds (or, when the model has LoRA layers already, those must be the same ones with the
    same rank and alpha). Returns the parts loaded. CheckpointError names any key that does not fit
    this model, and both shapes when a tensor's shape differs from the layer's."""
    path = Path(path)
    config = read_adapter_config(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        other = (
            " (adapter_model.bin, a pickle: qkv reads safetensors only)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS}{other}")
    source = SafetensorsFile(weights)
    model_type, rules = _layout(model)
    sites = {site.module: site for site in lora_sites(model)}
    where: dict[str, tuple[str, str]] = {}  # HF module -> (qkv module, slice name)
    for module, rule in rules.items():
        if module in sites:
            parts = tuple(p.name for p in sites[module].parts) if len(sites[module].parts) > 1 else ()
            for part, hf_name in _hf_names(module, rule, parts).items():
                where[hf_name] = (module, part)
    found: dict[str, dict[str, dict[str, str]]] = {}  # qkv module -> slice -> {"A"|"B": key}
    for key in sorted(source.names()):
        stem, _, kind = key.removesuffix(".weight").rpartition(".lora_")
        if not (key.startswith(PREFIX) and key.endswith(".weight") and kind in ("A", "B")):
            raise CheckpointError(
                f"{weights}: tensor {key} is not a LoRA A/B weight (base_model.model.<module>.lora_A.weight)"
            )
        hf_module = stem[len(PREFIX) :]
        if hf_module not in where:
            examples = ", ".join(sorted(where)[:4])
            raise CheckpointError(
                f"{weights}: {key} is for module {hf_module}, which this {model_type} model does not have "
                f"(its modules include {examples}); the adapter belongs to another architecture"
            )
        module, part = where[hf_module]
        found.setdefault(module, {}).setdefault(part, {})[kind] = key
    for parts in found.values():
        for keys in parts.values():
            if set(keys) != {"A", "B"}:
                raise CheckpointError(
                    f"{weights}: {next(iter(keys.values()))} has no lora_{'B' if 'A' in keys else 'A'} partner"
                )
    order = {m: [p.name for p in site.parts] for m, site in sites.items()}
    wanted = {m: tuple(sorted(parts, key=lambda p: order[m].index(p) if p else -1)) for m, parts in found.items()}
    layers = lora_layers(model)
    if layers:
        have = {name: tuple(s.name for s in layer.slices) for name, layer in layers.items()}
        if have != wanted:
            raise CheckpointError(
                f"{path}: the adapter covers {sorted(wanted)}, the model's LoRA layers are {sorted(have)}; "
                "load it onto a model without LoRA layers"
            )
        first = next(iter(layers.values()))
        if (first.rank, first.alpha, first.rslora) != (config.rank, config.alpha, config.rslora):
            raise CheckpointError(
                f"{path}: r={config.rank}, lora_alpha={config.alpha} (rslora {config.rslora}) differ from the "
                f"model's LoRA layers' r={first.rank}, alpha={first.alpha} (rslora {first.rslora})"
            )
    for module, parts in found.items():  # every shape checked before the model is touched
        site = sites[module]
        sizes = {p.name: p.size for p in site.parts} | {"": sum(p.size for p in site.parts)}
        in_features = site.parts and model.get_submodule(module).in_features
        for part, keys in parts.items():
            shapes = {"A": (config.rank, in_features), "B": (sizes[part], config.rank)}
            for kind, key in keys.items():
                got = source.shapes()[key]
                if tuple(got) != shapes[kind]:
                    raise CheckpointError(
                        f"{weights}: {key} has shape {tuple(got)}, but this model's {module}"
                        f"{'.' + part if part else ''} needs {shapes[kind]} (r={config.rank}); the adapter was "
                        "trained for another model size or architecture"
                    )
    names = apply_lora_parts(model, {m: tuple(p for p in parts if p) for m, parts in wanted.items()}, config) \
        if not layers else [f"{m}.{p}" if p else m for m, parts in wanted.items() for p in parts]  # fmt: skip
    layers = lora_layers(model)
    with torch.no_grad():
        for module, parts in found.items():
            layer = layers[module]
            index = {s.name: i for i, s in enumerate(layer.slices)}
            for part, keys in parts.items():
                A, B = layer.pair(index[part])
                A.copy_(source[keys["A"]].to(A.dtype))
                B.copy_(source[keys["B"]].to(B.dtype))
    return names
