"""Hugging Face model families as data: which `config.json` field feeds which `ModelConfig` field.

`HF_FAMILIES[model_type]` holds "fields" (qkv name -> HF name), "fixed" (what the family fixes),
"activation" (the HF field naming the MLP activation) and, where needed, "activations" (a
family's own activation names), "same_as" (HF fields that must equal another), "unsupported_true"
and "unsupported_values" (settings qkv refuses), "architecture" (the HF class written on export),
"heads_by_architecture" (the head comes from `architectures`, via HF_ENCODER_ARCHITECTURES).
`HF_ENCODER_ARCHITECTURES` chooses the head of a BERT-family checkpoint by its `architectures`.
`qkv.checkpoints.hf_config` reads these tables; adding a family is adding an entry here.
"""

from __future__ import annotations

from typing import Any

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
        "heads_by_architecture": True,  # see HF_ENCODER_ARCHITECTURES
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
    "ViTModel": dict(head="none", pooler=True),
    "ViTForImageClassification": dict(head="classification", classifier="first_token"),
}

# Vision (pre-norm, [CLS] + patches; no vocabulary). The position table and the patch projection's
# layout are the key map's business (`keymaps.VIT`).
_VISION_FIELDS = {
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "d_ff": "intermediate_size",
    "norm_eps": "layer_norm_eps",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "n_channels": "num_channels",
}
_VISION_FIXED = dict(
    family="vit", vocab_size=None, norm="layernorm", norm_position="pre", position="learned", qkv_bias=True,
    attn_out_bias=True, mlp_bias=True,
)  # fmt: skip
HF_FAMILIES["vit"] = {
    "fields": {**_VISION_FIELDS, "qkv_bias": "qkv_bias"},
    "fixed": {**_VISION_FIXED, "mlp": "gelu", "norm_eps": 1e-12},
    "activation": "hidden_act",
    "heads_by_architecture": True,
}
# CLIP's towers; a "clip" config.json nests one of each (see `hf_config.clip_config_from_hf`).
HF_FAMILIES["clip_text_model"] = {
    "fields": {
        "vocab_size": "vocab_size",
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "d_ff": "intermediate_size",
        "norm_eps": "layer_norm_eps",
        "max_seq_len": "max_position_embeddings",
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "pad_token_id": "pad_token_id",
    },
    # A causal text tower (CLIP runs it causally) with no head, pooled at the end-of-text token.
    "fixed": dict(
        family="encoder",
        norm="layernorm",
        norm_position="pre",
        position="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        mlp="quick_gelu",
        norm_eps=1e-5,
        tie_embeddings=False,
        head="none",
        max_seq_len=77,
    ),
    "activation": "hidden_act",
}
# CLIP: one config.json with a config per tower (model_type within them is ignored).
HF_FAMILIES["clip"] = {
    "towers": {"text": ("text_config", "clip_text_model"), "vision": ("vision_config", "clip_vision_model")},
    "architecture": "CLIPModel",
}
HF_FAMILIES["clip_vision_model"] = {
    "fields": _VISION_FIELDS,
    # pre_layrnorm after the embeddings; post_layernorm on the pooled [CLS] only; no patch bias.
    "fixed": {
        **_VISION_FIXED,
        "mlp": "quick_gelu",
        "norm_eps": 1e-5,
        "embed_norm": True,
        "patch_bias": False,
        "norm_pooled_only": True,
    },
    "activation": "hidden_act",
}


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


# HF activation names -> qkv `mlp` for plain and gated families.
PLAIN_ACTS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "swish": "silu",
    "silu": "silu",
    "quick_gelu": "quick_gelu",
}
GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh"}
