"""Apply a key map: foreign state dict <-> qkv state dict, with clear errors for any mismatch."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from qkv.checkpoints.keymaps import IGNORED_SUFFIXES, KeyRule
from qkv.errors import CheckpointError


def expand_rules(rules: tuple[KeyRule, ...], n_layers: int, n_decoder_layers: int | None = None) -> list[KeyRule]:
    """The rules with `{i}` expanded for every layer index (`{j}`: every decoder layer of a seq2seq model)."""
    out = []
    for rule in rules:
        key, count = ("j", n_decoder_layers or n_layers) if "{j}" in rule.target else ("i", n_layers)
        if "{" + key + "}" in rule.target:
            for i in range(count):
                fmt = {key: i}
                out.append(
                    KeyRule(rule.target.format(**fmt), tuple(s.format(**fmt) for s in rule.sources), rule.transform)
                )
        else:
            out.append(rule)
    return out


# Key-map transforms, foreign layout -> qkv's. Each has an inverse for export (`_untransform`).
TRANSFORMS = {
    "none": lambda t: t,
    "transpose": lambda t: t.t(),  # GPT-2's Conv1D keeps [in, out]
    "drop_batch_dim": lambda t: t[0],  # ViT's [1, N, D] position table and [1, 1, D] [CLS]
    "add_batch_dim": lambda t: t[None],  # CLIP's [D] class embedding -> [1, D]
    "conv_to_linear": lambda t: t.flatten(1),  # a stride-P convolution [D, C, P, P] as a linear layer
}


def _transform(t: torch.Tensor, transform: str) -> torch.Tensor:
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown key-map transform {transform!r}")
    return TRANSFORMS[transform](t)


def _untransform(t: torch.Tensor, transform: str, shape: tuple[int, ...] | None) -> torch.Tensor:
    """The inverse of `_transform` (conv_to_linear needs the kernel's (C, P, P) as `shape`)."""
    if transform == "drop_batch_dim":
        return t[None]
    if transform == "add_batch_dim":
        return t[0]
    if transform == "conv_to_linear":
        return t.view(t.shape[0], *shape)
    return _transform(t, transform)


def to_qkv_state_dict(
    source: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
    source_names: set[str],
    rules: tuple[KeyRule, ...],
    expected: Mapping[str, tuple[int, ...]],
    n_layers: int,
    origin: str = "checkpoint",
    tied: tuple[str, ...] = (),
    n_decoder_layers: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build qkv's state dict from a foreign one.

    source: the foreign tensors (a mapping, or a function name -> tensor for lazy/mmap reads).
    expected: qkv tensor name -> shape the model wants. `tied` names targets that may be absent
    (tied to another tensor). Raises CheckpointError naming `origin` for missing, unexpected or
    wrongly shaped tensors.
    """
    get = source.__getitem__ if isinstance(source, Mapping) else source
    by_target = {r.target: r for r in expand_rules(rules, n_layers, n_decoder_layers)}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for name, shape in expected.items():
        rule = by_target.get(name)
        if rule is None or not all(s in source_names for s in rule.sources):
            if name not in tied:
                missing.append(rule.sources[0] if rule else name)
            continue
        parts = [_transform(get(s), rule.transform) for s in rule.sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{origin}: tensor {' + '.join(rule.sources)} has shape {tuple(tensor.shape)} after mapping "
                f"to {name}, but the model's configuration implies {tuple(shape)}; the weights do not match it"
            )
        out[name] = tensor
        used.update(rule.sources)
    if missing:
        raise CheckpointError(
            f"{origin}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} in all); the file is incomplete or belongs to a different architecture"
        )
    unexpected = sorted(n for n in source_names - used if not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(
            f"{origin}: unexpected tensor(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)} in all); the checkpoint has weights this configuration does not use"
        )
    return out


def from_qkv_state_dict(
    state: Mapping[str, torch.Tensor],
    rules: tuple[KeyRule, ...],
    n_layers: int,
    split_sizes: Mapping[str, tuple[int, ...]],
    n_decoder_layers: int | None = None,
) -> dict[str, torch.Tensor]:
    """The inverse map, for export: qkv tensors -> foreign names.

    split_sizes: for a fused target (several sources), the dim-0 size of each source, keyed by the
    target without its block index (e.g. "attn.qkv_proj.weight", "decoder.cross_attn.kv_proj.weight");
    for a conv_to_linear target, the kernel's (C, P, P).
    """
    out: dict[str, torch.Tensor] = {}
    for rule in expand_rules(rules, n_layers, n_decoder_layers):
        if rule.target not in state:
            continue
        tensor = state[rule.target]
        key = re.sub(r"blocks\.\d+\.", "", rule.target)
        if len(rule.sources) == 1:
            parts = [tensor]
        else:
            parts = list(tensor.split(list(split_sizes[key]), dim=0))
        for src, part in zip(rule.sources, parts, strict=True):
            out[src] = _untransform(part, rule.transform, split_sizes.get(key)).contiguous()
    return out
