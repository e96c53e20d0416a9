"""Positions (`qkv.nn.position`): sinusoidal tables, RoPE and its scalings, ALiBi slopes.

References: the formulas of the papers computed in plain Python, and Hugging Face transformers'
own RoPE code (`ROPE_INIT_FUNCTIONS`, `LlamaRotaryEmbedding`, `apply_rotary_pos_emb`) and BLOOM's
ALiBi, configured through `rope_parameters` as transformers 5.x spells it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply_rotary
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary

from qkv.config import ModelConfig
from qkv.nn.mask import alibi_bias
from qkv.nn.position import (
    RotaryEmbedding,
    alibi_slopes,
    apply_rotary,
    relative_position_bucket,
    rope_inv_freq,
    sinusoidal_table,
)

# -- sinusoidal ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_positions", "dim"), [(50, 16), (9, 7), (3, 2)])
def test_sinusoidal_table_is_the_paper_formula(n_positions, dim):
    """Vaswani et al. 2017 §3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(same)."""
    expected = np.zeros((n_positions, dim))
    for pos in range(n_positions):
        for c in range(dim):
            angle = pos / 10000 ** (2 * (c // 2) / dim)
            expected[pos, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    table = sinusoidal_table(n_positions, dim)
    assert table.dtype == torch.float32 and table.shape == (n_positions, dim)
    np.testing.assert_allclose(table.numpy(), expected, atol=1e-6)


# -- RoPE: frequencies and tables against transformers ----------------------------------------------

LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
YARN = {"type": "yarn", "factor": 4.0}
# name -> (rope_scaling plus rope_theta, partial_rotary_factor); original context 32 of 128 positions
ROPE_CASES = {
    "default": ({}, 1.0),
    "default-theta": ({"rope_theta": 500000.0}, 1.0),
    "default-partial": ({}, 0.5),
    "linear": ({"type": "linear", "factor": 4.0}, 1.0),
    "dynamic": ({"type": "dynamic", "factor": 2.0}, 1.0),
    "llama3": ({**LLAMA3, "original_max_position_embeddings": 32}, 1.0),
    "llama3-partial": ({**LLAMA3, "original_max_position_embeddings": 32}, 0.5),
    "yarn": ({**YARN, "original_max_position_embeddings": 32}, 1.0),
    "yarn-no-truncate": ({**YARN, "original_max_position_embeddings": 32, "truncate": False}, 1.0),
    "yarn-mscale": ({**YARN, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.5}, 1.0),
    "yarn-attention-factor-betas": (
        {
            **YARN,
            "factor": 8.0,
            "original_max_position_embeddings": 16,
            "attention_factor": 1.3,
            "beta_fast": 16,
            "beta_slow": 2,
        },
        1.0,
    ),
    "yarn-implicit-original": (YARN, 1.0),  # original context defaults to max_seq_len on both sides
    "yarn-partial": ({**YARN, "original_max_position_embeddings": 32}, 0.5),
}
D_MODEL, N_HEADS, MAX_LEN = 64, 4, 128  # head_dim 16


def rope_configs(case: str):
    """(qkv ModelConfig, transformers config) describing the same rotary embedding."""
    params, partial = ROPE_CASES[case]
    params = dict(params)
    theta = params.pop("rope_theta", 10000.0)
    kind = params.pop("type", None)
    cfg = ModelConfig(
        d_model=D_MODEL, n_heads=N_HEADS, max_seq_len=MAX_LEN, position="rope", rope_theta=theta,
        rope_scaling={"type": kind, **params} if kind else None, partial_rotary_factor=partial,
    )  # fmt: skip
    rope_parameters = {"rope_type": kind or "default", "rope_theta": theta, **params}
    # LlamaRotaryEmbedding rotates whole heads; GPT-NeoX honours partial_rotary_factor.
    hf_cls = LlamaConfig if partial == 1.0 else GPTNeoXConfig
    if partial != 1.0:
        rope_parameters["partial_rotary_factor"] = partial
    hf = hf_cls(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, max_position_embeddings=MAX_LEN,
        rope_parameters=rope_parameters,
    )  # fmt: skip
    return cfg, hf


def hf_rotary(hf):
    return (LlamaRotaryEmbedding if isinstance(hf, LlamaConfig) else GPTNeoXRotaryEmbedding)(hf)


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_inv_freq_equals_transformers(case):
    cfg, hf = rope_configs(case)
    inv_freq, scale = rope_inv_freq(cfg)
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":
        ref = hf_rotary(hf)
        ref_inv_freq, ref_scale = ref.inv_freq, ref.attention_scaling
    else:
        ref_inv_freq, ref_scale = ROPE_INIT_FUNCTIONS[kind](hf, None)
    assert inv_freq.shape == (cfg.rotary_dim // 2,)
    torch.testing.assert_close(inv_freq, ref_inv_freq, atol=0, rtol=1e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-12)


def test_dynamic_ntk_beyond_the_context_equals_transformers():
    cfg, hf = rope_configs("dynamic")
    for seq_len in (MAX_LEN // 2, MAX_LEN, 300, 1000):
        ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, None, seq_len=seq_len)
        torch.testing.assert_close(rope_inv_freq(cfg, seq_len)[0], ref, atol=0, rtol=1e-6)
    assert not torch.allclose(rope_inv_freq(cfg, 300)[0], rope_inv_freq(cfg)[0])


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_cos_sin_equal_transformers(case):
    cfg, hf = rope_configs(case)
    # dynamic: positions past max_seq_len make both sides rescale the base for the longer sequence
    n = 300 if case == "dynamic" else MAX_LEN
    position_ids = torch.stack((torch.arange(n), torch.arange(n).flip(0)))
    cos, sin = RotaryEmbedding(cfg)(position_ids, torch.float32)
    ref_cos, ref_sin = hf_rotary(hf)(torch.zeros(1, dtype=torch.float32), position_ids)
    assert cos.shape == (2, 1, n, cfg.rotary_dim)
    torch.testing.assert_close(cos[:, 0], ref_cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin[:, 0], ref_sin, atol=1e-5, rtol=1e-5)


def test_linear_scaling_is_position_interpolation():
    """Chen et al. 2023: position p under factor s is rotated like position p / s without scaling."""
    scaled, _ = rope_configs("linear")
    plain = scaled.replace(rope_scaling=None)
    positions = torch.arange(0, 64, 4)[None]
    cos_s, sin_s = RotaryEmbedding(scaled)(positions, torch.float32)
    cos_p, sin_p = RotaryEmbedding(plain)(positions // 4, torch.float32)
    torch.testing.assert_close(cos_s, cos_p, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin_s, sin_p, atol=1e-6, rtol=0)


# -- RoPE: applying the rotation ------------------------------------------------------------------


def test_apply_rotary_equals_llama():
    cfg, hf = rope_configs("default")
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    position_ids = torch.arange(10).expand(2, 10)
    cos, sin = hf_rotary(hf)(q, position_ids)
    ref_q, ref_k = llama_apply_rotary(q, k, cos, sin)
    ours_cos, ours_sin = RotaryEmbedding(cfg)(position_ids, torch.float32)
    torch.testing.assert_close(apply_rotary(q, ours_cos, ours_sin), ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rotary(k, ours_cos, ours_sin), ref_k, atol=1e-5, rtol=1e-5)


def test_partial_apply_rotary_equals_neox_and_the_formula():
    """Rotate the first rotary_dim features as (x_i, x_{i+r/2}) pairs (half-split layout); pass the rest."""
    cfg, hf = rope_configs("default-partial")
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 4, 6, 16)
    position_ids = torch.arange(3, 9)[None]
    cos, sin = RotaryEmbedding(cfg)(position_ids, torch.float32)
    out = apply_rotary(q, cos, sin)
    ref_cos, ref_sin = hf_rotary(hf)(q, position_ids)
    ref_q, _ = neox_apply_rotary(q, k, ref_cos, ref_sin)
    torch.testing.assert_close(out, ref_q, atol=1e-5, rtol=1e-5)

    r, half = cfg.rotary_dim, cfg.rotary_dim // 2
    expected = q.clone()
    for t, pos in enumerate(position_ids[0].tolist()):
        for i in range(half):
            theta = pos * cfg.rope_theta ** (-2 * i / r)
            a, b = q[..., t, i], q[..., t, i + half]
            expected[..., t, i] = a * math.cos(theta) - b * math.sin(theta)
            expected[..., t, i + half] = b * math.cos(theta) + a * math.sin(theta)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[..., r:], q[..., r:])


@pytest.mark.parametrize("case", ["default", "default-partial", "linear", "llama3", "yarn"])
def test_rope_scores_depend_only_on_relative_position(case):
    """Su et al. 2021 §3.4: <R_m q, R_n k> is a function of n - m alone."""
    cfg, _ = rope_configs(case)
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 4, 1, 16, dtype=torch.float64), torch.randn(1, 4, 1, 16, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        cos_m, sin_m = rope(torch.tensor([[m]]), torch.float64)
        cos_n, sin_n = rope(torch.tensor([[n]]), torch.float64)
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum(-1)

    for m, n in [(0, 0), (5, 2), (3, 11), (40, 7)]:
        for offset in (1, 17, 60):
            torch.testing.assert_close(score(m + offset, n + offset), score(m, n), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 3))  # and it does depend on the distance


# -- ALiBi ---------------------------------------------------------------------------------------


def paper_slopes(n: int) -> list[float]:
    """Press et al. 2022, reference code: geometric from 2^(-8/n); odd counts interleave the next power."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n_heads", [1, 2, 6, 8, 12, 16, 20])
def test_alibi_slopes_equal_the_paper_and_bloom(n_heads):
    slopes = alibi_slopes(n_heads)
    np.testing.assert_allclose(slopes.numpy(), paper_slopes(n_heads), rtol=1e-6)
    torch.testing.assert_close(slopes, _get_alibi_slopes(n_heads, torch.device("cpu")).float())
    if n_heads == 8:  # the paper's example: 1/2, 1/4, ..., 1/256
        assert slopes.tolist() == [2.0**-i for i in range(1, 9)]


@pytest.mark.parametrize("n_heads", [8, 12])
def test_alibi_bias_matches_bloom_up_to_a_per_query_constant(n_heads):
    """BLOOM adds m_h * j; qkv adds -m_h * (i - j). They differ by m_h * i, which softmax ignores."""
    T = 9
    ours = alibi_bias(alibi_slopes(n_heads), torch.arange(T), torch.arange(T))[0]  # (H, T, T)
    bloom = build_alibi_tensor(torch.ones(1, T), n_heads, torch.float32).view(n_heads, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ours = ours.masked_fill(~causal, float("-inf"))
    bloom = bloom.expand(n_heads, T, T).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(ours.softmax(-1), bloom.softmax(-1))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("buckets", "distance"), [(32, 128), (8, 20)])
def test_t5_buckets_equal_transformers(bidirectional, buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 301)[None, :] - torch.arange(0, 5)[:, None]
    ref = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
    assert torch.equal(relative_position_bucket(relative, bidirectional, buckets, distance), ref)
