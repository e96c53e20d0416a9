"""Oracle helpers shared by tests: tiny random Hugging Face models and the same weights in qkv.

The `hf_pair` fixture (every config below) is in tests/conftest.py.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from qkv import DecoderLM
from qkv.checkpoints.convert import to_qkv_state_dict
from qkv.checkpoints.hf_config import config_from_hf
from qkv.checkpoints.keymaps import HF_KEYMAPS

transformers = pytest.importorskip("transformers")

# name -> (HF config class name, kwargs). Small, but with the awkward cases: odd GQA ratios,
# untied embeddings, explicit head_dim, biases, every RoPE scaling, a window shorter than inputs.
_LLAMA = dict(
    vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
HF_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                eos_token_id=0)),
    "gpt2-untied-ninner": ("GPT2Config", dict(vocab_size=97, n_embd=48, n_layer=3, n_head=6, n_positions=64,
                                              n_inner=72, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)),
    "llama-gqa-6-2": ("LlamaConfig", _LLAMA),
    "llama-mqa-tied": ("LlamaConfig", {**_LLAMA, "num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-mha-bias-mlpbias": ("LlamaConfig", {**_LLAMA, "num_key_value_heads": 6, "attention_bias": True,
                                               "mlp_bias": True}),
    "llama-head-dim-16": ("LlamaConfig", {**_LLAMA, "num_attention_heads": 4, "num_key_value_heads": 2,
                                          "head_dim": 16}),
    "llama-rope-linear": ("LlamaConfig", {**_LLAMA, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                        "rope_theta": 500.0}}),
    "llama-rope-dynamic": ("LlamaConfig", {**_LLAMA, "max_position_embeddings": 16,
                                           "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": 10000.0}}),
    "llama-rope-llama3": ("LlamaConfig", {**_LLAMA, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8, "rope_theta": 10000.0}}),
    "llama-rope-yarn": ("LlamaConfig", {**_LLAMA, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}}),
    "llama-rope-yarn-mscale": ("LlamaConfig", {**_LLAMA, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False}}),
    "mistral-window-8": ("MistralConfig", {**_LLAMA, "sliding_window": 8, "head_dim": 8}),
    "qwen2-bias": ("Qwen2Config", {**_LLAMA, "num_attention_heads": 4, "num_key_value_heads": 2}),
}  # fmt: skip

_HF_CLASSES = {"GPT2Config": "GPT2LMHeadModel", "LlamaConfig": "LlamaForCausalLM",
               "MistralConfig": "MistralForCausalLM", "Qwen2Config": "Qwen2ForCausalLM"}  # fmt: skip


def make_hf_model(name: str, seed: int = 0):
    """A tiny random HF causal LM in eval mode, fp32, eager attention (the reference path)."""
    cls_name, kwargs = HF_CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, _HF_CLASSES[cls_name])(config).eval()
    # Random init leaves biases at zero and norms at one; perturb everything so each weight matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def qkv_from_hf(hf_model) -> DecoderLM:
    """The same weights in a qkv DecoderLM, through the production config translation and key map."""
    hf_cfg = json.loads(hf_model.config.to_json_string())
    cfg = config_from_hf(hf_cfg)
    model = DecoderLM(cfg).eval()
    source = hf_model.state_dict()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = ("lm_head.weight",) if cfg.tie_embeddings else ()
    state = to_qkv_state_dict(source, set(source), HF_KEYMAPS[hf_cfg["model_type"]], expected, cfg.n_layers,
                              tied=tied)  # fmt: skip
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model


@functools.cache
def shared_pair(name: str) -> tuple:
    """(HF model, qkv model) with the same weights, built once per test session: for read-only use
    by tests that would otherwise rebuild the same pair for each of many cases."""
    hf = make_hf_model(name)
    return hf, qkv_from_hf(hf)
