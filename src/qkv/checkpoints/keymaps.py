"""Checkpoint key maps: how a foreign checkpoint's tensor names map onto qkv's, as data.

A `KeyRule` names one qkv tensor, the source tensor(s) it is made of, and a transform. Several
sources are concatenated along dim 0 (LLaMA's q/k/v into qkv's fused `qkv_proj`; gate/up into
the fused gated `up`); `transpose` undoes GPT-2's Conv1D layout ([in, out] -> [out, in]).
`{i}` stands for the layer index. Adding a family means adding a list here, not code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyRule:
    """qkv tensor `target` <- source tensor(s), with a transform ("none" or "transpose")."""

    target: str
    sources: tuple[str, ...]
    transform: str = "none"


def _rules(*rows: tuple) -> tuple[KeyRule, ...]:
    return tuple(KeyRule(row[0], (row[1],) if isinstance(row[1], str) else tuple(row[1]), *row[2:]) for row in rows)


_B = "blocks.{i}."

GPT2 = _rules(
    ("embed.tokens.weight", "transformer.wte.weight"),
    ("embed.positions.weight", "transformer.wpe.weight"),
    (_B + "attn_norm.weight", "transformer.h.{i}.ln_1.weight"),
    (_B + "attn_norm.bias", "transformer.h.{i}.ln_1.bias"),
    (_B + "attn.qkv_proj.weight", "transformer.h.{i}.attn.c_attn.weight", "transpose"),
    (_B + "attn.qkv_proj.bias", "transformer.h.{i}.attn.c_attn.bias"),
    (_B + "attn.o_proj.weight", "transformer.h.{i}.attn.c_proj.weight", "transpose"),
    (_B + "attn.o_proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    (_B + "mlp_norm.weight", "transformer.h.{i}.ln_2.weight"),
    (_B + "mlp_norm.bias", "transformer.h.{i}.ln_2.bias"),
    (_B + "mlp.up.weight", "transformer.h.{i}.mlp.c_fc.weight", "transpose"),
    (_B + "mlp.up.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    (_B + "mlp.down.weight", "transformer.h.{i}.mlp.c_proj.weight", "transpose"),
    (_B + "mlp.down.bias", "transformer.h.{i}.mlp.c_proj.bias"),
    ("norm.weight", "transformer.ln_f.weight"),
    ("norm.bias", "transformer.ln_f.bias"),
    ("lm_head.weight", "lm_head.weight"),
)

_L = "model.layers.{i}."

LLAMA = _rules(
    ("embed.tokens.weight", "model.embed_tokens.weight"),
    (_B + "attn_norm.weight", _L + "input_layernorm.weight"),
    (_B + "attn.qkv_proj.weight", [_L + f"self_attn.{p}_proj.weight" for p in "qkv"]),
    (_B + "attn.qkv_proj.bias", [_L + f"self_attn.{p}_proj.bias" for p in "qkv"]),
    (_B + "attn.o_proj.weight", _L + "self_attn.o_proj.weight"),
    (_B + "attn.o_proj.bias", _L + "self_attn.o_proj.bias"),
    (_B + "mlp_norm.weight", _L + "post_attention_layernorm.weight"),
    (_B + "mlp.up.weight", [_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"]),
    (_B + "mlp.up.bias", [_L + "mlp.gate_proj.bias", _L + "mlp.up_proj.bias"]),
    (_B + "mlp.down.weight", _L + "mlp.down_proj.weight"),
    (_B + "mlp.down.bias", _L + "mlp.down_proj.bias"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)


# BERT-family encoders (BERT, RoBERTa, ELECTRA). The body has the same names in all three under a
# prefix that depends on the architecture: "" for the bare model (BertModel), "bert." / "roberta." /
# "electra." when a head sits on it. `{p}` stands for that prefix (see `encoder_keymap`).
_E = "{p}encoder.layer.{i}."

ENCODER_BODY = _rules(
    ("embed.tokens.weight", "{p}embeddings.word_embeddings.weight"),
    ("embed.positions.weight", "{p}embeddings.position_embeddings.weight"),
    ("embed.token_types.weight", "{p}embeddings.token_type_embeddings.weight"),
    ("embed.norm.weight", "{p}embeddings.LayerNorm.weight"),
    ("embed.norm.bias", "{p}embeddings.LayerNorm.bias"),
    ("embed.project.weight", "{p}embeddings_project.weight"),  # ELECTRA, when embedding_size != d_model
    ("embed.project.bias", "{p}embeddings_project.bias"),
    (_B + "attn.qkv_proj.weight", [_E + f"attention.self.{p}.weight" for p in ("query", "key", "value")]),
    (_B + "attn.qkv_proj.bias", [_E + f"attention.self.{p}.bias" for p in ("query", "key", "value")]),
    (_B + "attn.o_proj.weight", _E + "attention.output.dense.weight"),
    (_B + "attn.o_proj.bias", _E + "attention.output.dense.bias"),
    (_B + "attn_norm.weight", _E + "attention.output.LayerNorm.weight"),
    (_B + "attn_norm.bias", _E + "attention.output.LayerNorm.bias"),
    (_B + "mlp.up.weight", _E + "intermediate.dense.weight"),
    (_B + "mlp.up.bias", _E + "intermediate.dense.bias"),
    (_B + "mlp.down.weight", _E + "output.dense.weight"),
    (_B + "mlp.down.bias", _E + "output.dense.bias"),
    (_B + "mlp_norm.weight", _E + "output.LayerNorm.weight"),
    (_B + "mlp_norm.bias", _E + "output.LayerNorm.bias"),
    ("pooler.dense.weight", "{p}pooler.dense.weight"),
    ("pooler.dense.bias", "{p}pooler.dense.bias"),
)


def _head(dense: str | None, norm: str | None, out: str, out_bias: str | None = None) -> tuple[KeyRule, ...]:
    """A head's rules from the HF module names of its dense layer, norm and output layer."""
    rows: list[tuple] = []
    if dense:
        rows += [("head.dense.weight", dense + ".weight"), ("head.dense.bias", dense + ".bias")]
    if norm:
        rows += [("head.norm.weight", norm + ".weight"), ("head.norm.bias", norm + ".bias")]
    target = "head.decoder" if out_bias else "head.out_proj"
    rows += [(target + ".weight", out + ".weight"), (target + ".bias", out_bias or out + ".bias")]
    return _rules(*rows)


# model_type -> head -> rules. MLM decoders are tied to the word embeddings unless the config unties them.
ENCODER_HEADS: dict[str, dict[str, tuple[KeyRule, ...]]] = {
    "bert": {
        "mlm": _head("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                     "cls.predictions.decoder", "cls.predictions.bias"),
        "classification": _head(None, None, "classifier"),
        "token_classification": _head(None, None, "classifier"),
    },
    "roberta": {
        "mlm": _head("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias"),
        "classification": _head("classifier.dense", None, "classifier.out_proj"),
        "token_classification": _head(None, None, "classifier"),
    },
    "electra": {
        "rtd": _head("discriminator_predictions.dense", None, "discriminator_predictions.dense_prediction"),
        "mlm": _head("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head",
                     "generator_lm_head.bias"),
        "classification": _head("classifier.dense", None, "classifier.out_proj"),
        "token_classification": _head(None, None, "classifier"),
    },
}  # fmt: skip


def with_prefix(rules: tuple[KeyRule, ...], prefix: str) -> tuple[KeyRule, ...]:
    """The rules with their `{p}` filled in: "" for a bare model, "bert." etc. under a head."""
    return tuple(KeyRule(r.target, tuple(s.replace("{p}", prefix) for s in r.sources), r.transform) for r in rules)


def encoder_keymap(model_type: str, head: str, prefix: str) -> tuple[KeyRule, ...]:
    """The body's rules under `prefix` plus the rules of `head` for a BERT-family model_type."""
    return with_prefix(ENCODER_BODY, prefix) + ENCODER_HEADS[model_type].get(head, ())


# Encoder-decoders: "encoder." and "decoder." stacks; `{j}` stands for a decoder layer index (the
# decoder may have another depth). Source and target embeddings are one tensor in qkv.
_EB, _DB = "encoder.blocks.{i}.", "decoder.blocks.{j}."


def _bart_layer(src: str, dst: str, cross: bool) -> list[tuple]:
    rows = []
    for hf_name, ours in (("self_attn", "attn"), *((("encoder_attn", "cross_attn"),) if cross else ())):
        for kind in ("weight", "bias"):
            if ours == "attn":
                rows.append((dst + f"attn.qkv_proj.{kind}", [src + f"self_attn.{p}_proj.{kind}" for p in "qkv"]))
            else:
                rows.append((dst + f"cross_attn.q_proj.{kind}", src + f"encoder_attn.q_proj.{kind}"))
                rows.append((dst + f"cross_attn.kv_proj.{kind}", [src + f"encoder_attn.{p}_proj.{kind}" for p in "kv"]))
            rows.append((dst + f"{ours}.o_proj.{kind}", src + f"{hf_name}.out_proj.{kind}"))
            norm = "attn_norm" if ours == "attn" else "cross_norm"
            rows.append((dst + f"{norm}.{kind}", src + f"{hf_name}_layer_norm.{kind}"))
    for kind in ("weight", "bias"):
        rows += [(dst + f"mlp.up.{kind}", src + f"fc1.{kind}"), (dst + f"mlp.down.{kind}", src + f"fc2.{kind}"),
                 (dst + f"mlp_norm.{kind}", src + f"final_layer_norm.{kind}")]  # fmt: skip
    return rows


def _bart_stack(side: str) -> list[tuple]:
    rows = [(f"{side}.embed.positions.weight", f"model.{side}.embed_positions.weight")]
    rows += [(f"{side}.embed.norm.{k}", f"model.{side}.layernorm_embedding.{k}") for k in ("weight", "bias")]
    index = "{i}" if side == "encoder" else "{j}"
    return rows + _bart_layer(f"model.{side}.layers.{index}.", _EB if side == "encoder" else _DB, side == "decoder")


# BART and Marian (Marian has no learned positions or embedding norm: those rows go unused).
BART = _rules(
    ("encoder.embed.tokens.weight", "model.shared.weight"),
    *_bart_stack("encoder"),
    *_bart_stack("decoder"),
    ("lm_head.weight", "lm_head.weight"),
    ("final_logits_bias", "final_logits_bias"),
)


def _t5(gated: bool) -> tuple[KeyRule, ...]:
    """T5's names; v1.1's gated FFN has `wi_0` (gate) and `wi_1` (up) where v1.0 has `wi`."""
    wi = ["DenseReluDense.wi_0.weight", "DenseReluDense.wi_1.weight"] if gated else ["DenseReluDense.wi.weight"]
    rows: list[tuple] = [("encoder.embed.tokens.weight", "shared.weight"), ("lm_head.weight", "lm_head.weight")]
    for side, dst, index in (("encoder", _EB, "{i}"), ("decoder", _DB, "{j}")):
        src = f"{side}.block.{index}.layer."
        ffn = 2 if side == "decoder" else 1  # the decoder's cross-attention is layer 1
        rows += [
            (
                f"{side}.relative_bias.embed.weight",
                f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            ),
            (f"{side}.norm.weight", f"{side}.final_layer_norm.weight"),
            (dst + "attn.qkv_proj.weight", [src + f"0.SelfAttention.{p}.weight" for p in "qkv"]),
            (dst + "attn.o_proj.weight", src + "0.SelfAttention.o.weight"),
            (dst + "attn_norm.weight", src + "0.layer_norm.weight"),
            (dst + "mlp.up.weight", [src + f"{ffn}.{w}" for w in wi]),
            (dst + "mlp.down.weight", src + f"{ffn}.DenseReluDense.wo.weight"),
            (dst + "mlp_norm.weight", src + f"{ffn}.layer_norm.weight"),
        ]
        if side == "decoder":
            rows += [
                (dst + "cross_attn.q_proj.weight", src + "1.EncDecAttention.q.weight"),
                (dst + "cross_attn.kv_proj.weight", [src + f"1.EncDecAttention.{p}.weight" for p in "kv"]),
                (dst + "cross_attn.o_proj.weight", src + "1.EncDecAttention.o.weight"),
                (dst + "cross_norm.weight", src + "1.layer_norm.weight"),
            ]
    return _rules(*rows)


T5, T5_GATED = _t5(gated=False), _t5(gated=True)

# ViT: HF keeps the [CLS] vector and the position table with a leading batch dim and the patch
# projection as a convolution; qkv keeps them as [1, D], an embedding table and a linear layer.
# `{p}` is "" for ViTModel and "vit." under a head.
_V = "{p}encoder.layer.{i}."


def _plain_layer(src: str, dst: str, names: dict[str, str]) -> list[tuple]:
    """Rows for one pre-norm layer whose HF names `names` gives for: q, k, v, o, norm1, norm2, fc1, fc2."""
    rows = []
    for kind in ("weight", "bias"):
        rows += [
            (dst + f"attn.qkv_proj.{kind}", [src + f"{names[p]}.{kind}" for p in "qkv"]),
            (dst + f"attn.o_proj.{kind}", src + f"{names['o']}.{kind}"),
            (dst + f"attn_norm.{kind}", src + f"{names['norm1']}.{kind}"),
            (dst + f"mlp_norm.{kind}", src + f"{names['norm2']}.{kind}"),
            (dst + f"mlp.up.{kind}", src + f"{names['fc1']}.{kind}"),
            (dst + f"mlp.down.{kind}", src + f"{names['fc2']}.{kind}"),
        ]
    return rows


VIT = _rules(
    ("embed.cls", "{p}embeddings.cls_token", "drop_batch_dim"),
    ("embed.positions.weight", "{p}embeddings.position_embeddings", "drop_batch_dim"),
    ("embed.project.weight", "{p}embeddings.patch_embeddings.projection.weight", "conv_to_linear"),
    ("embed.project.bias", "{p}embeddings.patch_embeddings.projection.bias"),
    *_plain_layer(_V, _B, {"q": "attention.attention.query", "k": "attention.attention.key",
                           "v": "attention.attention.value", "o": "attention.output.dense", "norm1": "layernorm_before",
                           "norm2": "layernorm_after", "fc1": "intermediate.dense", "fc2": "output.dense"}),
    ("norm.weight", "{p}layernorm.weight"),
    ("norm.bias", "{p}layernorm.bias"),
    ("pooler.dense.weight", "{p}pooler.dense.weight"),
    ("pooler.dense.bias", "{p}pooler.dense.bias"),
    ("head.out_proj.weight", "classifier.weight"),
    ("head.out_proj.bias", "classifier.bias"),
)  # fmt: skip

# CLIP: the text tower's layers are `{i}`, the vision tower's `{j}` (the towers' depths differ).
_CLIP_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
               "norm1": "layer_norm1", "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}  # fmt: skip
CLIP = _rules(
    ("text.embed.tokens.weight", "text_model.embeddings.token_embedding.weight"),
    ("text.embed.positions.weight", "text_model.embeddings.position_embedding.weight"),
    *_plain_layer("text_model.encoder.layers.{i}.", "text.blocks.{i}.", _CLIP_LAYER),
    ("text.norm.weight", "text_model.final_layer_norm.weight"),
    ("text.norm.bias", "text_model.final_layer_norm.bias"),
    ("vision.embed.cls", "vision_model.embeddings.class_embedding", "add_batch_dim"),
    ("vision.embed.positions.weight", "vision_model.embeddings.position_embedding.weight"),
    ("vision.embed.project.weight", "vision_model.embeddings.patch_embedding.weight", "conv_to_linear"),
    ("vision.embed.norm.weight", "vision_model.pre_layrnorm.weight"),
    ("vision.embed.norm.bias", "vision_model.pre_layrnorm.bias"),
    *_plain_layer("vision_model.encoder.layers.{j}.", "vision.blocks.{j}.", _CLIP_LAYER),
    ("vision.norm.weight", "vision_model.post_layernorm.weight"),
    ("vision.norm.bias", "vision_model.post_layernorm.bias"),
    ("text_projection.weight", "text_projection.weight"),
    ("visual_projection.weight", "visual_projection.weight"),
    ("logit_scale", "logit_scale"),
)

# Hugging Face `model_type` -> key map. Families that differ from LLaMA only in config share it.
HF_KEYMAPS: dict[str, tuple[KeyRule, ...]] = {
    "gpt2": GPT2,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "bart": BART,
    "marian": BART,
    "t5": T5,  # T5_GATED when the FFN is gated (see `qkv.checkpoints.hf.hf_keymap`)
    "vit": VIT,  # its {p} prefix is filled by `qkv.checkpoints.hf.hf_keymap`
    "clip": CLIP,
}


# Source tensors that carry no weights of their own and are skipped: buffers some checkpoints
# contain, and aliases (BERT/RoBERTa save the MLM decoder's bias a second time when untied).
IGNORED_SUFFIXES = (
    ".attn.bias",
    ".attn.masked_bias",
    "rotary_emb.inv_freq",
    "embeddings.position_ids",
    "cls.predictions.decoder.bias",
    "lm_head.decoder.bias",
    "encoder.embed_tokens.weight",  # seq2seq checkpoints that also store the shared embedding per stack
    "decoder.embed_tokens.weight",
)

# GGUF (llama.cpp) tensor names, as written by llama.cpp's `convert_hf_to_gguf.py`. The loader
# (`qkv.checkpoints.gguf`) also undoes the converter's row permutation of attn_q/attn_k.
_K = "blk.{i}."

GGUF_LLAMA = _rules(
    ("embed.tokens.weight", "token_embd.weight"),
    (_B + "attn_norm.weight", _K + "attn_norm.weight"),
    (_B + "attn.qkv_proj.weight", [_K + f"attn_{p}.weight" for p in "qkv"]),
    (_B + "attn.qkv_proj.bias", [_K + f"attn_{p}.bias" for p in "qkv"]),
    (_B + "attn.o_proj.weight", _K + "attn_output.weight"),
    (_B + "attn.o_proj.bias", _K + "attn_output.bias"),
    (_B + "mlp_norm.weight", _K + "ffn_norm.weight"),
    (_B + "mlp.up.weight", [_K + "ffn_gate.weight", _K + "ffn_up.weight"]),
    (_B + "mlp.up.bias", [_K + "ffn_gate.bias", _K + "ffn_up.bias"]),
    (_B + "mlp.down.weight", _K + "ffn_down.weight"),
    (_B + "mlp.down.bias", _K + "ffn_down.bias"),
    ("norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
)

# GGUF `general.architecture` -> key map.
GGUF_KEYMAPS: dict[str, tuple[KeyRule, ...]] = {
    "llama": GGUF_LLAMA,
}
