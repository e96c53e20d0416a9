"""`causal_attention` (block-causal explicit attention for CPU training) against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qkv.nn.causal_attention as ca
from qkv.nn.causal_attention import causal_attention, causal_attention_fits


def qkv_grad(fn, q, k, v, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def inputs(dtype, B=2, H=3, T=37, hd=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Heads laid out as the fused projection gives them: [B, T, H, hd] transposed to [B, H, T, hd].
    q, k, v, g = (torch.randn(B, T, H, hd, generator=gen).transpose(1, 2).to(dtype) for _ in range(4))
    return q, k, v, g


@pytest.mark.parametrize("block", [ca.BLOCK, 8, 37, 100])  # several blocks, a ragged last one, one block
def test_output_and_gradients_match_sdpa_in_float32(monkeypatch, block):
    monkeypatch.setattr(ca, "BLOCK", block)
    q, k, v, g = inputs(torch.float32)
    scale = 0.3
    out, grads = qkv_grad(lambda q, k, v: causal_attention(q, k, v, scale), q, k, v, g)
    ref, ref_grads = qkv_grad(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), q, k, v, g
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, ours, theirs in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=name)


def test_bfloat16_matches_the_float32_reference_to_bf16_rounding():
    q, k, v, g = inputs(torch.bfloat16, T=130)
    scale = 16**-0.5
    out, grads = qkv_grad(lambda q, k, v: causal_attention(q, k, v, scale), q, k, v, g)
    ref, ref_grads = qkv_grad(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
        *(t.float() for t in (q, k, v, g)),
    )
    assert out.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in grads)
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)
    for name, ours, theirs in zip("qkv", grads, ref_grads):
        err = (ours.float() - theirs).abs().max() / theirs.abs().max()
        assert err < 0.02, name  # a few bf16 ulps of the largest gradient


def test_the_future_does_not_leak():
    q, k, v, _ = inputs(torch.float32, T=20)
    out = causal_attention(q, k, v, 0.25)
    v2 = v.clone()
    v2[:, :, 12:] += 100.0  # change only the keys' values after position 11
    out2 = causal_attention(q, k, v2, 0.25)
    assert torch.equal(out[:, :, :12], out2[:, :, :12])
    assert not torch.equal(out[:, :, 12:], out2[:, :, 12:])


def test_under_autocast_it_runs_in_the_inputs_dtype():
    q, k, v, g = inputs(torch.bfloat16, T=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = qkv_grad(lambda q, k, v: causal_attention(q, k, v, 0.25), q, k, v, g)
    plain, plain_grads = qkv_grad(lambda q, k, v: causal_attention(q, k, v, 0.25), q, k, v, g)
    assert torch.equal(out, plain)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


def test_fits_only_cpu_training_in_half_precision_without_dropout_or_grouped_heads():
    q, k, _, _ = inputs(torch.bfloat16)
    q.requires_grad_(True)
    assert causal_attention_fits(q, k, 0.0)
    assert not causal_attention_fits(q, k, 0.1)  # dropout: the fused kernel
    assert not causal_attention_fits(q.float(), k.float(), 0.0)  # float32: the fused kernel is as fast
    assert not causal_attention_fits(q, k[:, :1], 0.0)  # grouped key/value heads
    with torch.no_grad():
        assert not causal_attention_fits(q, k, 0.0)  # inference keeps no probabilities
    assert not causal_attention_fits(q.detach(), k, 0.0)  # nothing to differentiate
    big = torch.empty(64, 32, 2048, 64, dtype=torch.bfloat16, requires_grad=True)
    assert not causal_attention_fits(big, big, 0.0)  # 4 GB of probabilities: over MAX_SAVED_BYTES


def test_mismatched_shapes_are_a_clear_error():
    q, k, v, _ = inputs(torch.float32)
    with pytest.raises(ValueError, match=r"q \[B, H, T, hd\] and k, v \[B, KV, T, hd\]"):
        causal_attention(q, k[:, :, :5], v[:, :, :5], 0.25)  # other lengths
    with pytest.raises(ValueError, match="expand grouped key/value heads first"):
        causal_attention(q.requires_grad_(True), k[:, :1], v[:, :1], 0.25)  # training with grouped heads
    q = q.detach()
    with pytest.raises(ValueError, match="KV must divide H"):
        causal_attention(torch.cat((q, q[:, :1]), 1), k[:, :3], v[:, :3], 0.25)  # 4 query heads over 3


def test_grouped_heads_without_grad_match_sdpa():
    """A prefill's grouped heads (GQA, MQA) go through one matmul per kv head, never expanded."""
    q, k, v, _ = inputs(torch.float32, H=6, T=150)
    for kv in (3, 1):
        with torch.no_grad():
            ours = causal_attention(q, k[:, :kv], v[:, :kv], 0.3)
        ref = F.scaled_dot_product_attention(q, k[:, :kv], v[:, :kv], is_causal=True, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [3, 7])
def test_peaked_rows_stay_near_the_fused_bf16_kernels_error(seed):
    # Scores of tens, as trained models have: rounded to bfloat16 (8 bits) they would move a peaked
    # row's weights by percents, and the output error to 8x the kernel's here. Float32 scores leave
    # only the weights' rounding before their product with V (as the prefill path rounds them).
    q, k, v, g = inputs(torch.bfloat16, B=2, H=4, T=96, hd=64, seed=seed)
    q, k = (q.float() * 3).bfloat16(), (k.float() * 3).bfloat16()
    scale = 64**-0.5

    def fused(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    ref, ref_grads = qkv_grad(fused, *(t.float() for t in (q, k, v, g)))
    kernel, kernel_grads = qkv_grad(fused, q, k, v, g)
    ours, grads = qkv_grad(lambda q, k, v: causal_attention(q, k, v, scale), q, k, v, g)
    assert (ours.float() - ref).abs().max() <= 2.5 * (kernel.float() - ref).abs().max()
    for name, theirs, mine, exact in zip("qkv", kernel_grads, grads, ref_grads):
        assert (mine.float() - exact).abs().max() <= 3 * (theirs.float() - exact).abs().max(), name
