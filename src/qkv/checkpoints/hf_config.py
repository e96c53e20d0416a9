"""Hugging Face `config.json` <-> `ModelConfig`, driven by the tables in `hf_families`.

The tables say, for each supported model_type, which HF field feeds which qkv field and which
layer types the family fixes; this module applies them both ways and handles what is not a
one-to-one field (RoPE in its 4.x and 5.x spellings, a BERT-family head from `architectures`,
RoBERTa's padding positions, T5's head scaling).
"""

from __future__ import annotations

from typing import Any

from qkv.checkpoints.hf_families import GATED_ACTS, HF_ENCODER_ARCHITECTURES, HF_FAMILIES, PLAIN_ACTS
from qkv.config import ModelConfig
from qkv.errors import CheckpointError
from qkv.models.vision import CLIPConfig

__all__ = ["HF_ENCODER_ARCHITECTURES", "HF_FAMILIES", "config_from_hf", "config_to_hf", "hf_model_type"]


def hf_tensor_prefix(architecture: str, model_type: str) -> str:
    """Where a BERT-family body's tensors sit: "" for the bare model, "bert." etc. under a head."""
    return "" if architecture.endswith("Model") else f"{model_type}."


def _encoder_values(hf: dict[str, Any], model_type: str, family: dict[str, Any], origin: str) -> dict[str, Any]:
    """The head, pooler and position fields of a BERT-family config, from `architectures`."""
    archs = [a for a in hf.get("architectures") or [] if a in HF_ENCODER_ARCHITECTURES]
    known = [a for a in HF_ENCODER_ARCHITECTURES if a.lower().startswith(model_type)]
    if hf.get("architectures") and not archs:
        raise CheckpointError(
            f"{origin}: architectures {hf['architectures']} are not supported for model_type {model_type!r}; "
            f"supported: {', '.join(known)}"
        )
    arch = archs[0] if archs else known[0]  # no architectures: the bare model
    values = dict(HF_ENCODER_ARCHITECTURES[arch])
    labels = hf.get("id2label")
    values["num_labels"] = len(labels) if isinstance(labels, dict) and labels else int(hf.get("num_labels") or 2)
    if family.get("positions_from_padding"):
        pad = hf.get("pad_token_id")
        if not isinstance(pad, int) or pad < 0:
            raise CheckpointError(f"{origin}: RoBERTa-style positions need an integer pad_token_id, got {pad!r}")
        values.update(position_offset=pad + 1, positions_skip_padding=True)
    return {**values, "extra_architecture": arch}


def _seq2seq_values(hf: dict[str, Any], model_type: str, family: dict[str, Any], origin: str) -> dict[str, Any]:
    """Encoder-decoder settings that are not one-to-one fields."""
    for theirs, ours in family.get("same_as", {}).items():
        if hf.get(theirs) is not None and hf.get(theirs) != hf.get(ours):
            raise CheckpointError(
                f"{origin}: {theirs}={hf[theirs]} differs from {ours}={hf.get(ours)}; qkv's encoder and decoder "
                "share these sizes"
            )
    values: dict[str, Any] = {}
    if hf.get("decoder_start_token_id") is None:
        values["decoder_start_token_id"] = hf.get("pad_token_id")  # T5's convention
    if model_type == "t5" and "scale_decoder_outputs" not in hf:
        # transformers 4.x: the head is rescaled exactly when it is tied (v1.0 yes, v1.1 no).
        values["scale_decoder_output"] = hf.get("tie_word_embeddings") is not False
    return values


def _rope(hf: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta"))
    scaling = dict(hf.get("rope_scaling") or params)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    scaling.pop("rope_theta", None)
    scaling.pop("rope_type", None)
    scaling["type"] = kind
    return theta, scaling


def config_from_hf(hf: dict[str, Any], origin: str = "config.json") -> ModelConfig:
    """Translate a HF config dict into a `ModelConfig`; CheckpointError names what is wrong."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{origin}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in HF_FAMILIES:
        raise CheckpointError(
            f"{origin}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(HF_FAMILIES))}"
        )
    family = HF_FAMILIES[model_type]
    if "towers" in family:
        return _towers_from_hf(hf, family, origin)
    for flag in family.get("unsupported_true", ()):
        if hf.get(flag):
            raise CheckpointError(f"{origin}: {flag}=true is not supported by qkv's {model_type} implementation")
    for name, allowed in family.get("unsupported_values", {}).items():
        if hf.get(name) not in allowed:
            raise CheckpointError(
                f"{origin}: {name}={hf.get(name)!r} is not supported by qkv's {model_type} implementation "
                f"(supported: {', '.join(repr(a) for a in allowed if a is not None)})"
            )
    values: dict[str, Any] = dict(family["fixed"])
    for ours, theirs in family["fields"].items():
        if hf.get(theirs) is not None:
            values[ours] = hf[theirs]
    architecture = None
    if values["family"] == "seq2seq":
        values.update(_seq2seq_values(hf, model_type, family, origin))
    if family.get("heads_by_architecture"):
        values.update(_encoder_values(hf, model_type, family, origin))
        architecture = values.pop("extra_architecture")
        if values.get("positions_skip_padding") and "max_seq_len" in values:
            values["max_seq_len"] -= values["position_offset"]  # the table's first rows serve padding
    for required in ("vocab_size", "d_model", "n_layers", "n_heads"):
        if values.get(required) is None and not (required == "vocab_size" and values["family"] == "vit"):
            name = family["fields"][required]
            raise CheckpointError(f"{origin}: missing required field {name!r} for model_type {model_type!r}")
    act = hf.get(family["activation"])
    if act is not None:
        gated = values["mlp"] in ("swiglu", "geglu", "geglu_tanh")
        table = family.get("activations") or (GATED_ACTS if gated else PLAIN_ACTS)
        if act not in table:
            raise CheckpointError(f"{origin}: activation {act!r} is not supported; supported: {', '.join(table)}")
        values["mlp"] = table[act]
    if values.get("position") == "rope":
        theta, scaling = _rope(hf)
        if theta is not None:
            values["rope_theta"] = float(theta)
        if scaling is not None:
            values["rope_scaling"] = scaling
        if hf.get("partial_rotary_factor") is not None:
            values["partial_rotary_factor"] = float(hf["partial_rotary_factor"])
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointError(f"{origin}: Qwen2 per-layer sliding windows (use_sliding_window=true) are not supported")
    if model_type == "gpt2" and hf.get("scale_attn_weights") is False:
        values["attn_scale"] = 1.0
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        # HF configs often keep a family default (GPT-2's 50256) on resized vocabularies; HF itself
        # only warns. An id the model cannot emit is dropped rather than carried into generation.
        value = values.get(name)
        vocab = values.get("vocab_size") or 0
        if isinstance(value, list):
            value = [i for i in value if isinstance(i, int) and 0 <= i < vocab] or None
        elif value is not None and not (isinstance(value, int) and 0 <= value < vocab):
            value = None
        values[name] = value
    values["extra"] = {"hf_model_type": model_type, **({"hf_architecture": architecture} if architecture else {})}
    try:
        return ModelConfig(**values)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{origin}: {exc}") from exc


def _towers_from_hf(hf: dict[str, Any], family: dict[str, Any], origin: str) -> CLIPConfig:
    """CLIP: each tower's config translated as its own family, plus the shared space's settings."""
    towers = {}
    for name, (key, model_type) in family["towers"].items():
        sub = hf.get(key)
        if not isinstance(sub, dict):
            raise CheckpointError(f"{origin}: missing {key!r} (an object describing CLIP's {name} tower)")
        towers[name] = config_from_hf({**sub, "model_type": model_type}, origin=f"{origin} ({key})")
    try:
        return CLIPConfig(
            **towers, projection_dim=int(hf.get("projection_dim", 512)),
            logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)),
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{origin}: {exc}") from exc


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type that can express `cfg` exactly; CheckpointError if none can."""
    if cfg.family == "decoder":
        gpt2_like = (
            cfg.position == "learned"
            and cfg.norm == "layernorm"
            and cfg.norm_position == "pre"
            and cfg.qkv_bias
            and cfg.attn_out_bias
            and cfg.mlp_bias
            and cfg.mlp in ("gelu_tanh", "gelu", "relu")
            and cfg.n_kv_heads == cfg.n_heads
            and cfg.head_dim * cfg.n_heads == cfg.d_model
        )
        if gpt2_like:
            return "gpt2"
        if cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp in GATED_ACTS.values():
            if cfg.sliding_window:
                if not (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias):
                    return "mistral"
            elif cfg.qkv_bias and not cfg.attn_out_bias and not cfg.mlp_bias:
                return "qwen2"
            elif cfg.qkv_bias == cfg.attn_out_bias:
                return "llama"
    if cfg.family == "seq2seq":
        kinds = {"t5": "t5", "learned": "bart", "sinusoidal": "marian"}
        if cfg.position in kinds and (cfg.position != "sinusoidal" or cfg.sinusoid_layout == "halves"):
            return kinds[cfg.position]
    if cfg.family == "vit" and not cfg.norm_pooled_only:
        return "vit"
    if cfg.family == "encoder":
        if cfg.positions_skip_padding:
            return "roberta"
        return "electra" if cfg.embedding_size != cfg.d_model or cfg.head == "rtd" else "bert"
    raise CheckpointError(
        "this model cannot be expressed as a Hugging Face checkpoint of a supported model_type "
        f"({', '.join(sorted(HF_FAMILIES))}); save it in qkv's native format instead"
    )


def hf_encoder_architecture(cfg: ModelConfig, model_type: str) -> str:
    """The HF architecture that carries `cfg`'s head (and pooler) on a `model_type` body."""
    for arch, values in HF_ENCODER_ARCHITECTURES.items():
        same_head = values["head"] == cfg.head and values.get("pooler", False) == cfg.pooler
        if (
            arch.lower().startswith(model_type)
            and same_head
            and values.get("classifier", cfg.classifier) == cfg.classifier
        ):
            return arch
    raise CheckpointError(
        f"no Hugging Face {model_type} architecture has head={cfg.head!r} with pooler={cfg.pooler} "
        f"(and classifier={cfg.classifier!r}); save it in qkv's native format instead"
    )


def config_to_hf(cfg: ModelConfig | CLIPConfig, model_type: str | None = None) -> dict[str, Any]:
    """The HF config.json dict for `cfg` (inverse of `config_from_hf`); model_type: a CLIP tower's."""
    if isinstance(cfg, CLIPConfig):
        family = HF_FAMILIES["clip"]
        hf = {key: config_to_hf(getattr(cfg, name), sub) for name, (key, sub) in family["towers"].items()}
        return {**hf, "model_type": "clip", "architectures": [family["architecture"]],
                "projection_dim": cfg.projection_dim, "logit_scale_init_value": cfg.logit_scale_init}  # fmt: skip
    model_type = model_type or hf_model_type(cfg)
    family = HF_FAMILIES[model_type]
    hf: dict[str, Any] = {"model_type": model_type}
    for ours, theirs in family["fields"].items():
        hf[theirs] = getattr(cfg, ours)
    acts = family.get("activations") or (GATED_ACTS if cfg.gated_mlp else PLAIN_ACTS)
    hf[family["activation"]] = next(k for k, v in acts.items() if v == cfg.mlp)
    for theirs, ours in family.get("same_as", {}).items():
        hf[theirs] = hf[ours]
    architectures = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM"}  # fmt: skip
    if cfg.family == "seq2seq":
        hf["architectures"] = [family["architecture"]]
        hf["is_encoder_decoder"] = True
        hf["forced_eos_token_id"] = None  # qkv forces no token; HF would at max_length for BART/Marian
    elif family.get("heads_by_architecture"):
        hf["architectures"] = [hf_encoder_architecture(cfg, model_type)]
        hf["num_labels"] = cfg.num_labels
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        if cfg.positions_skip_padding:
            hf["max_position_embeddings"] = cfg.max_seq_len + cfg.position_offset
    elif model_type in architectures:
        hf["architectures"] = [architectures[model_type]]
    if cfg.position == "rope":
        hf["rope_theta"] = cfg.rope_theta
        params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling:
            scaling = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
            params = {**scaling, "rope_type": cfg.rope_scaling["type"], "rope_theta": cfg.rope_theta}
            hf["rope_scaling"] = {**scaling, "rope_type": cfg.rope_scaling["type"]}
        hf["rope_parameters"] = params
        if cfg.partial_rotary_factor != 1.0:
            hf["partial_rotary_factor"] = cfg.partial_rotary_factor
    if model_type == "gpt2":
        hf["n_inner"] = cfg.d_ff
        if cfg.attn_scale == 1.0:
            hf["scale_attn_weights"] = False
    if model_type == "mistral":
        hf["head_dim"] = cfg.head_dim
    hf["torch_dtype"] = "float32"
    return hf
