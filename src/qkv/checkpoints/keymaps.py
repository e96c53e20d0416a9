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

# Hugging Face `model_type` -> key map. Families that differ from LLaMA only in config share it.
HF_KEYMAPS: dict[str, tuple[KeyRule, ...]] = {
    "gpt2": GPT2,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
}

# Source tensors that carry no weights (buffers some checkpoints contain) and are skipped.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

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
