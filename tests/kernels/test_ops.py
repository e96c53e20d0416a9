"""`qkv.kernels.ops`: the C decode-step attention against a float64 reference, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from qkv.kernels import ops
from qkv.nn import attention
from qkv.nn.mask import AttentionMask

pytestmark = pytest.mark.skipif(not ops.single_query_available(), reason="the C kernels are not built here")
NEG = torch.finfo(torch.bfloat16).min


def reference(q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v in float64, the query heads grouped over the kv heads."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    scores = q.double() @ k.transpose(-2, -1) * scale
    if bias is not None:
        scores = scores + bias.double()
    return scores.softmax(-1) @ v


CASES = {
    # B, H, KV, S, hd, bias: "causal" (a static cache filled to `valid`), "padded" (per sequence), "alibi", None
    "gqa-static-cache": (16, 9, 3, 256, 64, "causal"),
    "mha": (4, 4, 4, 64, 32, "causal"),
    "mqa-hd128": (5, 8, 1, 40, 128, None),
    "left-padded": (6, 6, 2, 33, 16, "padded"),
    "per-head-bias": (4, 6, 3, 50, 64, "alibi"),
}


def make(B, H, KV, S, hd, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g).bfloat16() for shape in ((B, H, 1, hd), (B, KV, S, hd), (B, KV, S, hd)))
    bias = None
    if kind == "causal":
        bias = torch.zeros(1, 1, 1, S).bfloat16()
        bias[..., S // 2 :] = NEG
    elif kind == "padded":
        bias = torch.zeros(B, 1, 1, S)
        for b in range(B):
            bias[b, ..., : b * 3] = NEG  # sequence b starts b * 3 slots in
    elif kind == "alibi":
        slopes = torch.tensor([2.0 ** -(i + 1) for i in range(H)])
        bias = (-slopes[:, None] * torch.arange(S - 1, -1, -1)).view(1, H, 1, S)
    return q, k, v, bias


@pytest.mark.parametrize("case", CASES)
def test_single_query_attention_matches_float64(case):
    B, H, KV, S, hd, kind = CASES[case]
    q, k, v, bias = make(B, H, KV, S, hd, kind)
    got = ops.single_query_attention(q, k, v, bias, hd**-0.5)
    want = reference(q, k, v, bias, hd**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (B, H, 1, hd)
    # one bfloat16 rounding of the output (2^-8 relative), and float32 sums before it
    assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


def test_decode_attention_takes_the_kernel_from_native_min_batch_on(monkeypatch):
    q, k, v, bias = make(attention.NATIVE_MIN_BATCH, 9, 3, 64, 64, "causal")
    calls = []
    native = ops.single_query_attention
    monkeypatch.setattr(ops, "single_query_attention", lambda *a: calls.append(1) or native(*a))
    fast = attention._single_query(q, k, v, AttentionMask(bias), 0.125)
    assert calls == [1]
    slow = attention._single_query(q[:1], k[:1], v[:1], AttentionMask(bias), 0.125)  # one sequence: torch ops
    assert calls == [1]
    assert (fast[:1].float() - slow.float()).abs().max() <= 2**-7 * slow.abs().max()


def test_a_compiled_graph_calls_the_kernel():
    from torch._inductor.utils import run_and_get_code

    q, k, v, bias = make(4, 9, 3, 64, 64, "causal", seed=1)
    mask = AttentionMask(bias)
    fn = torch.compile(lambda q, k, v: attention._single_query(q, k, v, mask, 0.125), fullgraph=True)
    got, code = run_and_get_code(fn, q, k, v)
    assert "single_query_attention" in "\n".join(code)
    assert torch.equal(got, ops.single_query_attention(q, k, v, bias, 0.125))
