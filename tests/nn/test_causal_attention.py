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


# The prefill kernel (`qkv/kernels/causal_attention.c`): bfloat16, no gradients, AVX-512 BF16.
native = pytest.mark.skipif(
    not ca.native_available(), reason="causal_attention.c is not built here (needs AVX-512 BF16)"
)


def _fused_and_exact(q, k, v, scale):
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    exact = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, scale=scale, enable_gqa=True
    )
    return fused, exact


@native
@pytest.mark.parametrize(
    "B,H,KV,T,hd",
    [
        (2, 4, 4, 37, 64),
        (1, 9, 3, 512, 64),
        (1, 8, 2, 100, 128),
        (1, 6, 1, 1, 32),
        (3, 2, 1, 65, 96),
        (1, 5, 5, 33, 32),
    ],
)
def test_native_kernel_matches_the_exact_attention_as_the_fused_kernel_does(B, H, KV, T, hd):
    """Ragged tiles (T not a multiple of 32), one token, grouped and multi-query heads, head dims 32 to 128."""
    gen = torch.Generator().manual_seed(T + H)
    q, k, v = (torch.randn(B, n, T, hd, generator=gen).mul(2).bfloat16() for n in (H, KV, KV))
    scale = hd**-0.5
    with torch.no_grad():
        ours = ca._native(q, k, v, scale)
        blocks = ca._forward_blocks(q, k, v, scale, keep=False)[0]
        fused, exact = _fused_and_exact(q, k, v, scale)
    assert ours.shape == q.shape and ours.dtype == torch.bfloat16
    fused_err = (fused.double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= 2 * fused_err + 1e-6
    # The torch blocks do the same arithmetic: at most a bf16 rounding apart, in few elements.
    diff = (ours.float() - blocks.float()).abs()
    assert diff.max() <= 2 * 2**-8 * blocks.float().abs().max() and (diff > 0).float().mean() < 0.05


@native
def test_native_kernel_reads_strided_heads_and_writes_the_projection_order():
    gen = torch.Generator().manual_seed(1)
    B, T, H, KV, hd = 2, 70, 6, 2, 64
    fused_qkv = torch.randn(B, T, H + 2 * KV, hd, generator=gen).bfloat16()  # as Attention's projection gives
    q, k, v = (t.transpose(1, 2) for t in fused_qkv.split((H, KV, KV), dim=2))
    with torch.no_grad():
        out = ca._native(q, k, v, 0.125)
        plain = ca._native(q.contiguous(), k.contiguous(), v.contiguous(), 0.125)
    assert torch.equal(out, plain)
    assert out.transpose(1, 2).is_contiguous()  # [B, T, H, hd] memory: the output projection copies nothing


@native
@pytest.mark.parametrize("seed", [3, 7])
def test_native_kernel_on_peaked_rows_stays_near_the_fused_kernels_error(seed):
    q, k, v, _ = inputs(torch.bfloat16, B=2, H=4, T=96, hd=64, seed=seed)
    q, k = (q.float() * 3).bfloat16(), (k.float() * 3).bfloat16()
    with torch.no_grad():
        ours = causal_attention(q, k, v, 0.125)
        fused, exact = _fused_and_exact(q, k, v, 0.125)
    assert (ours.double() - exact).abs().max() <= 2.5 * (fused.double() - exact).abs().max()


@native
def test_native_kernel_keeps_the_future_out():
    q, k, v, _ = inputs(torch.bfloat16, H=4, T=80, hd=32)
    v2 = v.clone()
    v2[:, :, 50:] += 100.0
    with torch.no_grad():
        out, out2 = causal_attention(q, k, v, 0.25), causal_attention(q, k, v2, 0.25)
    assert torch.equal(out[:, :, :50], out2[:, :, :50]) and not torch.equal(out[:, :, 50:], out2[:, :, 50:])


@native
def test_a_prefill_of_any_length_takes_the_kernel_where_it_is_built(monkeypatch):
    q = torch.empty(1, 9, 64, 64, dtype=torch.bfloat16)
    k = torch.empty(1, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert ca.PREFILL_MIN_TOKENS > 64 and causal_attention_fits(q, k, 0.0)
        assert not causal_attention_fits(q[..., :16], k[..., :16], 0.0)  # head dim 16: not the kernel's
        long = torch.empty(1, 1, ca.NATIVE_MAX_TOKENS + 1, 64, dtype=torch.bfloat16)
        assert not causal_attention_fits(long, long, 0.0)  # past where it was measured: the fused kernel
        monkeypatch.setattr(ca, "NATIVE", False)  # QKV_NATIVE_ATTENTION=0
        assert not causal_attention_fits(q, k, 0.0)


@native
def test_native_kernel_rejects_a_head_dim_it_does_not_take():
    q = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"qkv_causal_attention_bf16 failed \(1\)"):
        ca._native(q, q, q, 0.25)


def _bottom_right(T, S):
    """The mask of T queries that are the last T of S positions (query i sees keys <= S - T + i)."""
    return torch.ones(T, S, dtype=torch.bool).tril(S - T)


@native
@pytest.mark.parametrize("T,S", [(40, 100), (1, 33), (64, 64 + 512), (7, 8)])
def test_native_kernel_takes_a_chunk_after_cached_keys(T, S):
    """A prompt's chunk after a KV cache: the queries are the last T of S keys."""
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(2, 6, T, 64, generator=gen).mul(2).bfloat16()
    k, v = (torch.randn(2, 2, S, 64, generator=gen).mul(2).bfloat16() for _ in range(2))
    allowed = _bottom_right(T, S)
    with torch.no_grad():
        assert causal_attention_fits(q, k, 0.0)
        ours = causal_attention(q, k, v, 0.125)
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.125, enable_gqa=True)
        exact = F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=allowed, scale=0.125, enable_gqa=True
        )
        # the chunk's rows equal the same rows of a prefill of all S positions (same kernel)
        whole = causal_attention(torch.cat((torch.zeros(2, 6, S - T, 64).bfloat16(), q), 2), k, v, 0.125)
    assert (ours.double() - exact).abs().max() <= 2 * (fused.double() - exact).abs().max() + 1e-6
    assert torch.equal(ours, whole[:, :, S - T :])


def test_longer_keys_than_queries_need_the_kernel():
    q = torch.zeros(1, 2, 8, 16)  # float32: not the kernel's
    with pytest.raises(ValueError, match=r"or \[B, KV, S > T, hd\] where the C kernel runs"):
        causal_attention(q, torch.zeros(1, 2, 12, 16), torch.zeros(1, 2, 12, 16), 0.25)
    assert not causal_attention_fits(q.bfloat16(), torch.zeros(1, 2, 4, 16).bfloat16(), 0.0)  # fewer keys
