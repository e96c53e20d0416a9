"""Running a RoPE model past the context it was trained on: RoPE scaling put on a loaded model.

    model = qkv.load("smollm2-135m-instruct")       # trained on 8,192 positions
    scale_rope(model, "yarn:2")                       # now takes 16,384
    model.generate(long_ids, max_new_tokens=64)

The scalings are those `qkv.nn.position.rope_inv_freq` implements (formulas as in transformers):
- linear: position interpolation (Chen et al. 2023): positions are divided by the factor, so the
  context grows by it;
- dynamic: dynamic NTK (bloc97/emozilla): the base grows with the sequence once it passes the
  trained length, so there is no fixed limit;
- yarn: YaRN (Peng et al. 2023): NTK-by-parts interpolation plus an attention temperature; the
  context grows by the factor.
"""

from __future__ import annotations

import dataclasses

import torch

from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.nn.position import RotaryEmbedding

ROPE_SCALING_KINDS = ("linear", "dynamic", "yarn")
DEFAULT_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling to put on a model: its kind (`ROPE_SCALING_KINDS`) and factor (>= 1)."""

    kind: str
    factor: float = DEFAULT_FACTOR

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALING_KINDS:
            raise UsageError(f"RoPE scaling {self.kind!r} is not known; choose one of: {', '.join(ROPE_SCALING_KINDS)}")
        factor = self.factor
        if (
            isinstance(factor, bool)
            or not isinstance(factor, int | float)
            or not factor >= 1.0
            or factor == float("inf")
        ):
            raise UsageError(
                f"RoPE scaling factor {factor!r} must be a finite number >= 1 (the context grows by it); "
                f"e.g. {self.kind}:2"
            )

    @classmethod
    def parse(cls, text: str) -> RopeScaling:
        """'KIND' or 'KIND:FACTOR' (e.g. 'yarn:4'); the factor defaults to `DEFAULT_FACTOR`."""
        kind, _, factor = text.strip().partition(":")
        if not factor:
            return cls(kind.strip().lower())
        try:
            value = float(factor)
        except ValueError:
            raise UsageError(f"RoPE scaling {text!r}: factor {factor!r} is not a number; write e.g. {kind}:2") from None
        return cls(kind.strip().lower(), value)

    def context(self, trained: int) -> int | None:
        """The context a model trained on `trained` positions takes under this scaling (None: unbounded)."""
        return None if self.kind == "dynamic" else int(trained * self.factor)


def scaled_config(cfg: ModelConfig, scaling: RopeScaling) -> ModelConfig:
    """`cfg` with `scaling` as its rope_scaling and max_seq_len grown to the scaled context.

    The trained length is kept as `original_max_position_embeddings` (HF's name), which YaRN
    reads and error messages name; dynamic NTK reads it from max_seq_len, which stays.
    """
    if cfg.position != "rope":
        raise UsageError(
            f"this model uses position={cfg.position!r}, not RoPE, so a RoPE scaling cannot apply; drop --rope-scaling"
        )
    if cfg.rope_scaling is not None:
        raise UsageError(
            f"this model already uses RoPE scaling {cfg.rope_scaling!r}; another cannot be put on top of it"
        )
    spec = {"type": scaling.kind, "factor": float(scaling.factor), "original_max_position_embeddings": cfg.max_seq_len}
    context = scaling.context(cfg.max_seq_len)
    return cfg.replace(rope_scaling=spec, max_seq_len=context or cfg.max_seq_len)


def scale_rope(model: torch.nn.Module, scaling: RopeScaling | str) -> torch.nn.Module:
    """Put a RoPE scaling ('linear', 'dynamic' or 'yarn', optionally ':FACTOR') on a loaded model, in
    place, and return it: every module holding the model's config gets the scaled one, and each
    rotary embedding is rebuilt from it. A model without RoPE, or with a scaling already, is refused.
    """
    if isinstance(scaling, str):
        scaling = RopeScaling.parse(scaling)
    old = model.config
    new = scaled_config(old, scaling)
    for module in list(model.modules()):
        for name in ("config", "cfg"):
            if getattr(module, name, None) is old:
                setattr(module, name, new)
        rope = getattr(module, "rope", None)
        if isinstance(rope, RotaryEmbedding):
            module.rope = RotaryEmbedding(new).to(rope.inv_freq.device)
    return model


def describe_context(cfg: ModelConfig) -> str:
    """The model's context in words, naming the trained length when a RoPE scaling stretched it:
    '16384 (8192 trained, x2.0 by linear RoPE scaling)'."""
    scaling = cfg.rope_scaling or {}
    trained = scaling.get("original_max_position_embeddings")
    if cfg.context_limit is None or trained is None or trained == cfg.context_limit:
        return str(cfg.context_limit)
    return f"{cfg.context_limit} ({trained} trained, x{scaling.get('factor')} by {scaling.get('type')} RoPE scaling)"


def rope_follows_length(cfg: ModelConfig, length: int) -> bool:
    """Whether a forward of `length` tokens must run whole rather than in chunks through a cache:
    under dynamic NTK scaling past the trained length, the RoPE base follows the longest position
    of each forward, so keys cached by an earlier, shorter chunk would be rotated with another
    base than the queries that read them (one forward gives every position the same base, as
    transformers does)."""
    return (cfg.rope_scaling or {}).get("type") == "dynamic" and length > cfg.max_seq_len


def prompt_spans(cfg: ModelConfig, length: int, chunk: int | None) -> list[tuple[int, int]]:
    """The [start, end) spans a prompt of `length` tokens is prefilled in, `chunk` tokens per
    forward: one span where `chunk` is None or the model's RoPE follows the forward's length."""
    if chunk is None or rope_follows_length(cfg, length):
        return [(0, length)]
    return [(start, min(length, start + chunk)) for start in range(0, length, chunk)]
