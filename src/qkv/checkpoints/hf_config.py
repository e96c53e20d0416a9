"""Hugging Face `config.json` -> `ModelConfig`, per `model_type`, as data.

`HF_FAMILIES` says, for each supported model_type, which HF field feeds which qkv field and
which layer types the family fixes. Older (4.x) and newer (5.x) spellings of RoPE settings are
both read: top-level `rope_theta`/`rope_scaling`, or `rope_parameters`.
"""

from __future__ import annotations

from typing import Any

from qkv.config import ModelConfig
from qkv.errors import CheckpointError

_LLAMA_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "d_ff": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
    "mlp_bias": "mlp_bias",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
_LLAMA_FIXED = dict(family="decoder", norm="rmsnorm", mlp="swiglu", position="rope", tie_embeddings=False)

HF_FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": {
        "fields": {
            "vocab_size": "vocab_size",
            "d_model": "n_embd",
            "n_layers": "n_layer",
            "n_heads": "n_head",
            "d_ff": "n_inner",
            "norm_eps": "layer_norm_epsilon",
            "max_seq_len": "n_positions",
            "tie_embeddings": "tie_word_embeddings",
            "bos_token_id": "bos_token_id",
            "eos_token_id": "eos_token_id",
            "pad_token_id": "pad_token_id",
        },
        "fixed": dict(
            family="decoder",
            norm="layernorm",
            position="learned",
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            tie_embeddings=True,
            mlp="gelu_tanh",
            norm_eps=1e-5,
        ),
        "activation": "activation_function",
        "unsupported_true": ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"),
    },
    "llama": {
        "fields": {**_LLAMA_FIELDS, "qkv_bias": "attention_bias", "attn_out_bias": "attention_bias"},
        "fixed": _LLAMA_FIXED,
        "activation": "hidden_act",
    },
    "mistral": {
        "fields": {**_LLAMA_FIELDS, "sliding_window": "sliding_window"},
        "fixed": _LLAMA_FIXED,
        "activation": "hidden_act",
    },
    "qwen2": {
        "fields": _LLAMA_FIELDS,
        "fixed": {**_LLAMA_FIXED, "qkv_bias": True},
        "activation": "hidden_act",
    },
}

# BERT-family encoders: one field table; RoBERTa and ELECTRA differ as data.
_BERT_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "d_ff": "intermediate_size",
    "norm_eps": "layer_norm_eps",
    "max_seq_len": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "tie_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
_BERT_FIXED = dict(
    family="encoder", norm="layernorm", norm_position="post", position="learned", qkv_bias=True, attn_out_bias=True,
    mlp_bias=True, embed_norm=True, tie_embeddings=True, mlp="gelu", norm_eps=1e-12, type_vocab_size=2,
)  # fmt: skip
for _model_type, _extra in (
    ("bert", {}),
    # RoBERTa: position ids skip padding and start at pad + 1, so the table has pad + 1 extra rows.
    ("roberta", {"positions_from_padding": True}),
    ("electra", {"fields": {**_BERT_FIELDS, "embedding_size": "embedding_size"}}),
):
    HF_FAMILIES[_model_type] = {
        "fields": _BERT_FIELDS,
        "fixed": _BERT_FIXED,
        "activation": "hidden_act",
        "unsupported_values": {"position_embedding_type": ("absolute", None)},
        **_extra,
    }

# HF `architectures` -> the head on a BERT-family body (heads are chosen by architecture, not by
# model_type). The bare model's tensors have no prefix; with a head they sit under "<model_type>.".
HF_ENCODER_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "BertModel": dict(head="none", pooler=True),
    "BertForMaskedLM": dict(head="mlm"),
    "BertForSequenceClassification": dict(head="classification", pooler=True, classifier="pooler"),
    "BertForTokenClassification": dict(head="token_classification"),
    "RobertaModel": dict(head="none", pooler=True),
    "RobertaForMaskedLM": dict(head="mlm"),
    "RobertaForSequenceClassification": dict(head="classification", classifier="dense_tanh"),
    "RobertaForTokenClassification": dict(head="token_classification"),
    "ElectraModel": dict(head="none"),
    "ElectraForPreTraining": dict(head="rtd"),
    "ElectraForMaskedLM": dict(head="mlm"),
    "ElectraForSequenceClassification": dict(head="classification", classifier="dense_gelu"),
    "ElectraForTokenClassification": dict(head="token_classification"),
}


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


# Encoder-decoders. BART and Marian share one field table; T5 has its own names.
_BART_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "n_layers": "encoder_layers",
    "n_decoder_layers": "decoder_layers",
    "n_heads": "encoder_attention_heads",
    "d_ff": "encoder_ffn_dim",
    "max_seq_len": "max_position_embeddings",
    "scale_embeddings": "scale_embedding",
    "tie_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "decoder_start_token_id": "decoder_start_token_id",
}
# BART: learned positions offset by 2 (fairseq's padding rows), an embedding LayerNorm, post-norm.
_BART_FIXED = dict(
    family="seq2seq", norm="layernorm", norm_eps=1e-5, norm_position="post", position="learned", position_offset=2,
    embed_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True, final_logits_bias=True, mlp="gelu",
)  # fmt: skip
# The decoder may not differ from the encoder in these (qkv's two stacks share one config).
_BART_SAME = {"decoder_attention_heads": "encoder_attention_heads", "decoder_ffn_dim": "encoder_ffn_dim"}
HF_FAMILIES["bart"] = {"fields": _BART_FIELDS, "fixed": _BART_FIXED, "activation": "activation_function",
                       "same_as": _BART_SAME, "architecture": "BartForConditionalGeneration"}  # fmt: skip
# Marian (the original Transformer's layout): sinusoidal positions with sin and cos in halves.
HF_FAMILIES["marian"] = {
    "fields": _BART_FIELDS,
    "fixed": {**_BART_FIXED, "position": "sinusoidal", "sinusoid_layout": "halves", "position_offset": 0,
              "embed_norm": False},
    "activation": "activation_function",
    "same_as": {**_BART_SAME, "decoder_vocab_size": "vocab_size"},
    "unsupported_values": {"share_encoder_decoder_embeddings": (True, None)},
    "architecture": "MarianMTModel",
}  # fmt: skip
HF_FAMILIES["t5"] = {
    "fields": {
        "vocab_size": "vocab_size",
        "d_model": "d_model",
        "n_layers": "num_layers",
        "n_decoder_layers": "num_decoder_layers",
        "n_heads": "num_heads",
        "head_dim": "d_kv",
        "d_ff": "d_ff",
        "norm_eps": "layer_norm_epsilon",
        "max_seq_len": "n_positions",
        "relative_buckets": "relative_attention_num_buckets",
        "relative_max_distance": "relative_attention_max_distance",
        "tie_embeddings": "tie_word_embeddings",
        "scale_decoder_output": "scale_decoder_outputs",
        "eos_token_id": "eos_token_id",
        "pad_token_id": "pad_token_id",
        "decoder_start_token_id": "decoder_start_token_id",
    },
    # T5 (Raffel et al. 2020): RMSNorm without bias, pre-norm, no biases, unscaled attention.
    "fixed": dict(family="seq2seq", norm="rmsnorm", norm_eps=1e-6, norm_position="pre", position="t5",
                  attn_scale=1.0, mlp="relu", scale_decoder_output=True, max_seq_len=512),
    "activation": "feed_forward_proj",
    # `feed_forward_proj` sets both the gating and the activation ("gated-gelu" is T5 v1.1's).
    "activations": {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu_tanh", "gated-silu": "swiglu"},
    "architecture": "T5ForConditionalGeneration",
}  # fmt: skip


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


# HF activation names -> qkv `mlp` for plain and gated families.
_PLAIN_ACTS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "swish": "silu",
    "silu": "silu",
}
_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh"}


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
    if values["family"] == "encoder":
        values.update(_encoder_values(hf, model_type, family, origin))
        architecture = values.pop("extra_architecture")
        if values.get("positions_skip_padding") and "max_seq_len" in values:
            values["max_seq_len"] -= values["position_offset"]  # the table's first rows serve padding
    for required in ("vocab_size", "d_model", "n_layers", "n_heads"):
        if required not in values:
            name = family["fields"][required]
            raise CheckpointError(f"{origin}: missing required field {name!r} for model_type {model_type!r}")
    act = hf.get(family["activation"])
    if act is not None:
        gated = values["mlp"] in ("swiglu", "geglu", "geglu_tanh")
        table = family.get("activations") or (_GATED_ACTS if gated else _PLAIN_ACTS)
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
        if isinstance(value, list):
            value = [i for i in value if isinstance(i, int) and 0 <= i < values["vocab_size"]] or None
        elif value is not None and not (isinstance(value, int) and 0 <= value < values["vocab_size"]):
            value = None
        values[name] = value
    values["extra"] = {"hf_model_type": model_type, **({"hf_architecture": architecture} if architecture else {})}
    try:
        return ModelConfig(**values)
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
        if cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp in _GATED_ACTS.values():
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


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json dict for `cfg` (inverse of `config_from_hf`)."""
    model_type = hf_model_type(cfg)
    family = HF_FAMILIES[model_type]
    hf: dict[str, Any] = {"model_type": model_type}
    for ours, theirs in family["fields"].items():
        hf[theirs] = getattr(cfg, ours)
    acts = family.get("activations") or (_GATED_ACTS if cfg.gated_mlp else _PLAIN_ACTS)
    hf[family["activation"]] = next(k for k, v in acts.items() if v == cfg.mlp)
    for theirs, ours in family.get("same_as", {}).items():
        hf[theirs] = hf[ours]
    architectures = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM"}  # fmt: skip
    if cfg.family == "seq2seq":
        hf["architectures"] = [family["architecture"]]
        hf["is_encoder_decoder"] = True
        hf["forced_eos_token_id"] = None  # qkv forces no token; HF would at max_length for BART/Marian
    elif cfg.family == "encoder":
        hf["architectures"] = [hf_encoder_architecture(cfg, model_type)]
        hf["num_labels"] = cfg.num_labels
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        if cfg.positions_skip_padding:
            hf["max_position_embeddings"] = cfg.max_seq_len + cfg.position_offset
    else:
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
