"""`ModelConfig`: one typed description of every model qkv builds, plus validation.

Per-family differences are data: a preset is a dict of overrides (see `qkv.presets`), and a
checkpoint loader maps a foreign config onto these fields. Derived fields (`head_dim`,
`n_kv_heads`, `d_ff`) are filled in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from qkv.errors import ConfigError

FAMILIES = ("decoder", "encoder", "seq2seq", "vit")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "swiglu", "geglu", "geglu_tanh")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "t5", "none")
SINUSOID_LAYOUTS = ("interleaved", "halves")  # sin/cos alternating (Vaswani et al.), or sin then cos (Marian)
ROPE_SCALINGS = ("linear", "dynamic", "llama3", "yarn")
ATTN_BACKENDS = ("sdpa", "eager")
# What sits on top of the stack: decoders have an LM head; encoders one of the others.
HEADS = {
    "decoder": ("lm",),
    "encoder": ("none", "mlm", "classification", "token_classification", "rtd"),
    "seq2seq": ("lm",),
    "vit": ("none", "classification"),
}
# Sequence classification on the first token: BERT's pooler, or a dense layer + activation (RoBERTa, ELECTRA).
CLASSIFIERS = ("pooler", "dense_tanh", "dense_gelu", "first_token")  # first_token: a linear layer on it (ViT)

# Keys each RoPE scaling type needs beyond `factor` (HF `rope_scaling` / `rope_parameters` names).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"ModelConfig.{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"ModelConfig.{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of a qkv model. Construct directly, via `from_name`, or from a checkpoint."""

    family: str = "decoder"
    vocab_size: int | None = 50257  # None for a pure vision model
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; otherwise GQA
    head_dim: int | None = None  # None -> d_model // n_heads
    d_ff: int | None = None  # None -> 4 * d_model
    n_decoder_layers: int | None = None  # seq2seq only; None -> n_layers
    # Layer types
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    mlp: str = "gelu"
    position: str = "learned"
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear"|"dynamic"|"llama3"|"yarn", "factor": ..}
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None  # attend to the last `sliding_window` positions (incl. self)
    sinusoid_layout: str = "interleaved"  # position="sinusoidal": see SINUSOID_LAYOUTS
    relative_buckets: int = 32  # position="t5": buckets of the relative position bias (Raffel et al. 2020)
    relative_max_distance: int = 128  # position="t5": distances beyond this share the last bucket
    attn_scale: float | None = None  # None -> 1/sqrt(head_dim); T5 uses 1.0
    attn_backend: str = "sdpa"
    # Biases and tying
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True  # LayerNorm only; RMSNorm has no bias
    tie_embeddings: bool = True
    # Regularisation (active in train mode only)
    dropout: float = 0.0  # embeddings and residual branches
    attn_dropout: float = 0.0
    # Embeddings
    type_vocab_size: int = 0  # BERT token types
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    embedding_size: int | None = None  # None -> d_model; ELECTRA projects smaller embeddings up to d_model
    position_offset: int = 0  # learned position ids start here (RoBERTa: pad_token_id + 1)
    positions_skip_padding: bool = False  # RoBERTa: count only non-pad tokens; padding sits at offset - 1
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani et al. §3.4; Marian, BART)
    # Encoder-decoder
    decoder_start_token_id: int | None = None  # the first decoder token of seq2seq generation
    scale_decoder_output: bool = False  # T5 v1.0: the LM head reads hidden * d_model^-0.5 (v1.1 does not)
    final_logits_bias: bool = False  # BART/Marian: a learned [vocab] bias added to the logits
    label_smoothing: float = 0.0  # in the LM loss (Szegedy et al. 2016; Vaswani et al. used 0.1)
    # Heads (encoders; decoders always have the LM head)
    head: str | None = None  # None -> the family's default: "lm" (decoder), "none" (encoder)
    pooler: bool = False  # dense + tanh on the first token -> pooler_output (BERT)
    classifier: str = "pooler"  # how `head="classification"` reads the first token, see CLASSIFIERS
    num_labels: int = 2  # classification heads; 1 means regression (MSE), as in HF
    # Special tokens (defaults for generation; tokenizers carry their own)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Vision
    image_size: int | None = None  # vit: max_seq_len follows, 1 + (image_size // patch_size)^2
    patch_size: int | None = None
    n_channels: int = 3
    patch_bias: bool = True  # the patch projection's bias (CLIP has none)
    norm_pooled_only: bool = False  # CLIP's vision tower: the final norm applies to the pooled first token only
    # Free-form provenance (e.g. the HF model_type this came from); not used by the model.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        _choice("family", self.family, FAMILIES)
        if self.family == "vit":
            for name in ("image_size", "patch_size", "n_channels"):
                _positive(name, getattr(self, name))
            if self.image_size % self.patch_size:
                raise ConfigError(
                    f"ModelConfig.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
                )
            set_(self, "max_seq_len", 1 + (self.image_size // self.patch_size) ** 2)  # [CLS] + the patches
        if self.vocab_size is not None or self.family != "vit":
            _positive("vocab_size", self.vocab_size)
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            _positive(name, getattr(self, name))
        if self.n_kv_heads is None:
            set_(self, "n_kv_heads", self.n_heads)
        _positive("n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ModelConfig.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each key/value head among n_heads/n_kv_heads query heads)"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly"
                )
            set_(self, "head_dim", self.d_model // self.n_heads)
        _positive("head_dim", self.head_dim)
        if self.d_ff is None:
            set_(self, "d_ff", 4 * self.d_model)
        _positive("d_ff", self.d_ff)
        if self.n_decoder_layers is None:
            set_(self, "n_decoder_layers", self.n_layers)
        _positive("n_decoder_layers", self.n_decoder_layers)
        _choice("norm", self.norm, NORMS)
        _choice("norm_position", self.norm_position, NORM_POSITIONS)
        _choice("mlp", self.mlp, MLPS)
        _choice("position", self.position, POSITIONS)
        _choice("sinusoid_layout", self.sinusoid_layout, SINUSOID_LAYOUTS)
        if self.position == "t5":
            _positive("relative_buckets", self.relative_buckets)
            _positive("relative_max_distance", self.relative_max_distance)
            if self.relative_buckets < 4 or self.relative_buckets % 2:
                raise ConfigError(
                    f"ModelConfig.relative_buckets={self.relative_buckets} must be an even number >= 4 (T5 splits "
                    "them between directions, then between exact and logarithmic distances)"
                )
            if self.relative_max_distance <= self.relative_buckets // 4:
                raise ConfigError(
                    f"ModelConfig.relative_max_distance={self.relative_max_distance} must exceed the exactly "
                    f"bucketed distances ({self.relative_buckets // 4} and below)"
                )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"ModelConfig.label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        _choice("attn_backend", self.attn_backend, ATTN_BACKENDS)
        if not self.norm_eps > 0:
            raise ConfigError(f"ModelConfig.norm_eps={self.norm_eps!r} must be > 0")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r} must be in [0, 1)")
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window)
        if self.position == "rope":
            if self.rope_theta <= 0:
                raise ConfigError(f"ModelConfig.rope_theta={self.rope_theta!r} must be > 0")
            if not 0.0 < self.partial_rotary_factor <= 1.0:
                raise ConfigError("ModelConfig.partial_rotary_factor must be in (0, 1]")
            if int(self.head_dim * self.partial_rotary_factor) % 2:
                raise ConfigError("ModelConfig: the rotary dimension (head_dim * partial_rotary_factor) must be even")
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [] if value is None else [value]
            bad = [i for i in ids if not isinstance(i, int) or self.vocab_size is None or not 0 <= i < self.vocab_size]
            if bad:
                raise ConfigError(
                    f"ModelConfig.{name}={value!r} lies outside the vocabulary [0, {self.vocab_size}); "
                    "set it to None or to a valid id"
                )
        self._check_heads()
        if self.embedding_size is None:
            set_(self, "embedding_size", self.d_model)
        _positive("embedding_size", self.embedding_size)
        if not isinstance(self.position_offset, int) or self.position_offset < 0:
            raise ConfigError(f"ModelConfig.position_offset={self.position_offset!r} must be an integer >= 0")
        if self.positions_skip_padding and (self.pad_token_id is None or self.position_offset < 1):
            raise ConfigError(
                "ModelConfig.positions_skip_padding needs pad_token_id and position_offset >= 1 "
                "(padding sits at position_offset - 1, as RoBERTa's padding_idx)"
            )

    def _check_heads(self) -> None:
        allowed = HEADS.get(self.family, ("none",))
        if self.head is None:
            object.__setattr__(self, "head", allowed[0])
        _choice("head", self.head, allowed)
        _choice("classifier", self.classifier, CLASSIFIERS)
        _positive("num_labels", self.num_labels)
        if self.classifier == "first_token" and self.family != "vit":
            raise ConfigError("ModelConfig.classifier='first_token' is ViT's head; text encoders use the others")
        if self.classifier == "pooler" and self.head == "classification" and not self.pooler:
            raise ConfigError("ModelConfig.classifier='pooler' needs pooler=True (BERT's pooled first token)")

    def _check_rope_scaling(self) -> None:
        scaling = dict(self.rope_scaling)
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind is None and set(scaling) - {"rope_theta", "partial_rotary_factor"}:
            raise ConfigError(
                f"ModelConfig.rope_scaling={self.rope_scaling!r} has no 'type'; "
                f"set 'type' to one of: {', '.join(ROPE_SCALINGS)} (or 'default')"
            )
        if kind in (None, "default"):
            object.__setattr__(self, "rope_scaling", None)
            return
        _choice("rope_scaling['type']", kind, ROPE_SCALINGS)
        missing = [k for k in ROPE_SCALING_KEYS[kind] if scaling.get(k) is None]
        if kind == "yarn" and "original_max_position_embeddings" in missing:
            missing.remove("original_max_position_embeddings")
            scaling["original_max_position_embeddings"] = self.max_seq_len
        if missing:
            raise ConfigError(f"ModelConfig.rope_scaling of type {kind!r} needs {', '.join(missing)}")
        if kind != "yarn" and float(scaling["factor"]) < 1.0:
            raise ConfigError(f"ModelConfig.rope_scaling['factor']={scaling['factor']} must be >= 1")
        scaling["type"] = kind
        scaling.pop("rope_type", None)
        object.__setattr__(self, "rope_scaling", scaling)

    # -- derived --------------------------------------------------------------------------------
    @property
    def gated_mlp(self) -> bool:
        """True for SwiGLU/GeGLU: the MLP has a gate projection."""
        return self.mlp in ("swiglu", "geglu", "geglu_tanh")

    @property
    def context_limit(self) -> int | None:
        """Longest sequence the model accepts; None when positions have no bound (dynamic NTK RoPE, T5)."""
        if (self.rope_scaling or {}).get("type") == "dynamic" or self.position == "t5":
            return None  # T5's relative buckets have no table to run past
        return self.max_seq_len

    @property
    def rotary_dim(self) -> int:
        """How many features of each head RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (exact name), with fields overridden by keyword."""
        from qkv.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that `from_dict` turns back into an equal config."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again).

        Fields that `__post_init__` derived (head_dim, n_kv_heads, d_ff, n_decoder_layers,
        embedding_size, head) are derived again from the new values unless they were set explicitly.
        """
        data = self.to_dict()
        derived = {
            "n_kv_heads": self.n_heads,
            "d_ff": 4 * self.d_model,
            "n_decoder_layers": self.n_layers,
            "embedding_size": self.d_model,
            "head": HEADS.get(self.family, ("none",))[0],
        }
        if self.d_model % self.n_heads == 0:
            derived["head_dim"] = self.d_model // self.n_heads
        for name, value in derived.items():
            if name not in changes and data[name] == value:
                data[name] = None
        return ModelConfig.from_dict({**data, **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
