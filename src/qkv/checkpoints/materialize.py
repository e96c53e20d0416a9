"""Turn a config + a state dict into a ready model without paying for random initialisation.

Modules are built on the meta device (no memory, no init), the loaded tensors are assigned in
place (`load_state_dict(assign=True)`), tied weights are re-tied, and the non-persistent buffers
(RoPE frequencies, sinusoid tables, ALiBi slopes) are recomputed on the real device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from qkv.config import ModelConfig
from qkv.errors import CheckpointError, UsageError
from qkv.nn.quant import empty_quantized

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name; None stays None (keep the checkpoint's dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_class(cfg: ModelConfig) -> Callable[[ModelConfig], nn.Module]:
    """The qkv model class for a config's family."""
    from qkv.models import MODEL_CLASSES

    if cfg.family not in MODEL_CLASSES:
        raise CheckpointError(f"no model class for family {cfg.family!r} yet")
    return MODEL_CLASSES[cfg.family]


def build_on_meta(cfg: ModelConfig) -> nn.Module:
    """The model for `cfg` with every parameter on the meta device (no memory, no init)."""
    with torch.device("meta"), _skip_init():
        return model_class(cfg)(cfg)


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Make `torch.nn.init`'s initialisers no-ops (as transformers' `no_init_weights` does).

    On meta tensors they compute nothing, yet `normal_` runs through torch's Python
    decompositions, and their first use imports torch._dynamo: ~1 s, most of a GGUF load.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for every parameter registered under more than one name (tied weights)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def materialize(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    origin: str = "checkpoint",
    quantized: dict[str, dict] | None = None,
    meta: nn.Module | None = None,
    fresh: bool = False,
) -> nn.Module:
    """A model holding exactly `state` (qkv names), in `dtype` if given, ready for eval.

    quantized: {module name: {"bits", "group_size"}} (`qkv.nn.quant.quantized_modules`): those
    linear layers become `QuantLinear`s before `state` is assigned, and their stored tensors
    (qweight, scales, zeros) keep their own dtypes whatever `dtype` says. A tied LM head that was
    quantized is its own module then, so it is not re-tied to the embeddings.
    meta: `build_on_meta(cfg)`, when the caller has built it already (it becomes the model).
    fresh: the quantized layers' tensors were allocated for this model (not views of a file or of
    another model's tensors), so they are taken as they are rather than copied.
    """
    model = build_on_meta(cfg) if meta is None else meta
    exact: set[str] = set()  # tensors `dtype` must not cast: a quantized layer's stored form
    if quantized:
        empty_quantized(model, quantized)
        exact = {f"{name}.{buffer}" for name in quantized for buffer in ("qweight", "scales", "zeros")}
    aliases = tied_aliases(model)  # after the swap: a quantized head no longer shares the embeddings' weight
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - set(aliases))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{origin}: tensors do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and k not in exact else v for k, v in state.items()}
    # A fresh, 64-byte aligned copy of the stored form: a tensor memory-mapped from a file sits at
    # whatever offset the file gives it, and torch's int8 CPU kernel (`_weight_int8pack_mm`, bf16
    # activations) crashes on a misaligned weight.
    if not fresh:
        state = {k: v.clone() if k in exact else v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in aliases}
    model.load_state_dict(state, strict=False, assign=True)
    for alias, source in aliases.items():  # assign=True replaced the shared parameter: share it again
        owner, _, name = alias.rpartition(".")
        setattr(model.get_submodule(owner), name, model.get_parameter(source))
    devices = (v.device for v in state.values() if not v.is_meta)  # a placeholder a caller fills later is meta
    reset_buffers(model, next(devices, torch.device("cpu")))
    return model.eval()


def reset_buffers(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Recompute every module's non-persistent buffers (RoPE frequencies, sinusoid tables, ALiBi
    slopes) on `device`: after building on the meta device, or after a cast that rounded them."""
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if reset is not None:
            reset(device)
    return model


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)` with its derived buffers recomputed in float32, as a load in `dtype` has them."""
    return reset_buffers(model.to(dtype), next(model.parameters()).device)
