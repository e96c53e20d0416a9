"""Named model presets: plain data read by `ModelConfig.from_name`.

Each preset lists the fields where a family differs from the `ModelConfig` defaults. The full-size
presets describe published architectures (shapes from their papers/config files); the `tiny-*`
presets are small versions for tests and the demo.
"""

from __future__ import annotations

from typing import Any

_GPT2: dict[str, Any] = dict(
    family="decoder", vocab_size=50257, max_seq_len=1024, norm="layernorm", mlp="gelu_tanh",
    position="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
    bos_token_id=50256, eos_token_id=50256,
)  # fmt: skip

_LLAMA: dict[str, Any] = dict(
    family="decoder", norm="rmsnorm", mlp="swiglu", position="rope", qkv_bias=False,
    attn_out_bias=False, mlp_bias=False, tie_embeddings=False,
)  # fmt: skip

_BERT: dict[str, Any] = dict(
    family="encoder", norm="layernorm", norm_position="post", norm_eps=1e-12, mlp="gelu", position="learned",
    qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, embed_norm=True, type_vocab_size=2,
    max_seq_len=512, pad_token_id=0,
)  # fmt: skip

_T5: dict[str, Any] = dict(
    family="seq2seq", norm="rmsnorm", norm_eps=1e-6, norm_position="pre", position="t5", attn_scale=1.0,
    mlp="relu", scale_decoder_output=True, max_seq_len=512, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0,
)  # fmt: skip

_BART: dict[str, Any] = dict(
    family="seq2seq", norm="layernorm", norm_position="post", position="learned", position_offset=2,
    embed_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True, final_logits_bias=True, mlp="gelu",
    max_seq_len=1024, bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
)  # fmt: skip

_TRANSFORMER: dict[str, Any] = dict(
    family="seq2seq", norm="layernorm", norm_position="post", position="sinusoidal", scale_embeddings=True,
    qkv_bias=True, attn_out_bias=True, mlp_bias=True, mlp="relu", label_smoothing=0.1, max_seq_len=512,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 (Radford et al. 2019)
    "gpt2": {**_GPT2, "d_model": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {**_GPT2, "d_model": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**_GPT2, "d_model": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**_GPT2, "d_model": 1600, "n_layers": 48, "n_heads": 25},
    # LLaMA 2 / 3 (Touvron et al. 2023; Meta 2024)
    "llama-2-7b": {
        **_LLAMA,
        "vocab_size": 32000,
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "d_ff": 11008,
        "max_seq_len": 4096,
        "norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "llama-3-8b": {
        **_LLAMA,
        "vocab_size": 128256,
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "d_ff": 14336,
        "max_seq_len": 8192,
        "rope_theta": 500000.0,
        "norm_eps": 1e-5,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "llama-3.1-8b": {
        **_LLAMA,
        "vocab_size": 128256,
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "d_ff": 14336,
        "max_seq_len": 131072,
        "rope_theta": 500000.0,
        "norm_eps": 1e-5,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
    # Mistral 7B v0.1 (Jiang et al. 2023): GQA 32/8 and a 4096-token sliding window
    "mistral-7b": {
        **_LLAMA,
        "vocab_size": 32000,
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "d_ff": 14336,
        "max_seq_len": 32768,
        "sliding_window": 4096,
        "norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # SmolLM2-135M (HuggingFaceTB 2024): LLaMA architecture, tied embeddings, GQA 9/3
    "smollm2-135m": {
        **_LLAMA,
        "vocab_size": 49152,
        "d_model": 576,
        "n_layers": 30,
        "n_heads": 9,
        "n_kv_heads": 3,
        "d_ff": 1536,
        "max_seq_len": 8192,
        "rope_theta": 100000.0,
        "tie_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
    # BERT (Devlin et al. 2019): post-norm, learned positions, token types, pooler
    "bert-base": {**_BERT, "vocab_size": 30522, "d_model": 768, "n_layers": 12, "n_heads": 12, "pooler": True},
    # RoBERTa (Liu et al. 2019): BERT's layers; positions skip padding and start at pad + 1
    "roberta-base": {
        **_BERT,
        "vocab_size": 50265,
        "d_model": 768,
        "n_layers": 12,
        "n_heads": 12,
        "norm_eps": 1e-5,
        "type_vocab_size": 1,
        "pad_token_id": 1,
        "position_offset": 2,
        "positions_skip_padding": True,
        "pooler": True,
        "bos_token_id": 0,
        "eos_token_id": 2,
    },
    # ELECTRA-small discriminator (Clark et al. 2020): 128-wide embeddings projected to 256
    "electra-small": {
        **_BERT,
        "vocab_size": 30522,
        "d_model": 256,
        "n_layers": 12,
        "n_heads": 4,
        "d_ff": 1024,
        "embedding_size": 128,
        "head": "rtd",
    },
    # all-MiniLM-L6-v2 (sentence-transformers): a 6-layer, 384-wide BERT
    "all-minilm-l6-v2": {
        **_BERT,
        "vocab_size": 30522,
        "d_model": 384,
        "n_layers": 6,
        "n_heads": 12,
        "d_ff": 1536,
        "pooler": True,
    },
    # T5 v1.0 small (Raffel et al. 2020): RMSNorm, pre-norm, no biases, relative buckets, tied head rescaled
    "t5-small": {
        **_T5,
        "vocab_size": 32128,
        "d_model": 512,
        "n_layers": 6,
        "n_heads": 8,
        "d_ff": 2048,
    },
    # BART base (Lewis et al. 2020): post-norm, learned positions offset by 2, embedding LayerNorm
    "bart-base": {**_BART, "vocab_size": 50265, "d_model": 768, "n_layers": 6, "n_heads": 12, "d_ff": 3072},
    # The original Transformer, base (Vaswani et al. 2017): post-norm, sinusoidal positions, ReLU,
    # shared embeddings scaled by sqrt(d_model), label smoothing 0.1 (vocabulary: WMT'14 en-de BPE)
    "transformer-base": {
        **_TRANSFORMER,
        "vocab_size": 37000,
        "d_model": 512,
        "n_layers": 6,
        "n_heads": 8,
        "d_ff": 2048,
    },
    # Tiny variants: same layer types, small shapes. For tests and `make demo`.
    "tiny-t5": {**_T5, "vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128},
    "tiny-bart": {
        **_BART,
        "vocab_size": 512,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff": 128,
        "max_seq_len": 256,
    },
    "tiny-bert": {**_BERT, "vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128},
    "tiny-gpt2": {
        **_GPT2,
        "vocab_size": 512,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "max_seq_len": 128,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "tiny-llama": {
        **_LLAMA,
        "vocab_size": 512,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_ff": 172,
        "max_seq_len": 256,
    },
    "tiny-mistral": {
        **_LLAMA,
        "vocab_size": 512,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_ff": 172,
        "max_seq_len": 256,
        "sliding_window": 16,
    },
    # The `make demo` model: a GPT-2-style decoder sized to train in a few minutes on 2 CPU cores.
    "tiny-gpt-demo": {
        **_GPT2,
        "vocab_size": 4096,
        "d_model": 192,
        "n_layers": 4,
        "n_heads": 6,
        "max_seq_len": 256,
        "mlp": "gelu",
        "bos_token_id": None,
        "eos_token_id": None,
    },
}
