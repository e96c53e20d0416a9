"""Attention masks (`qkv.nn.mask`) against a brute-force loop over HF's mask predicates.

HF `transformers.masking_utils` describes each mask as a predicate `(batch, head, q, kv) -> bool`;
looping it over every (query, key) pair is the slow, obviously-correct reference. qkv builds one
tensor (or none, for the fused-kernel fast paths) that must allow exactly the same pairs.
"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import (
    causal_mask_function,
    padding_mask_function,
    sliding_window_overlay,
)

from qkv.nn.mask import AttentionMask, alibi_bias, build_attention_mask


def allowed_pairs(mask: AttentionMask, B: int, T: int, S: int) -> torch.Tensor:
    """The [B, T, S] boolean "query may see key" that a mask means, fast paths included."""
    if mask.bias is None:
        if not mask.is_causal:
            return torch.ones(B, T, S, dtype=torch.bool)
        assert T <= S, "is_causal: the T queries are the last T of S keys"
        return torch.ones(T, S, dtype=torch.bool).tril(S - T).expand(B, T, S)
    assert not mask.is_causal
    bias = mask.bias[:, 0].expand(B, T, S)  # heads differ only by a position bias
    return bias > torch.finfo(bias.dtype).min / 2


def reference_pairs(q_slots, k_slots, causal, attention_mask, window, B):
    """Loop over HF's predicates for each batch row, query and key slot; -1 key slots are empty."""
    fns = []
    if window is not None:  # HF: kv_idx > q_idx - window
        fns.append(sliding_window_overlay(window))
    if causal:
        fns.append(causal_mask_function)
    if attention_mask is not None:
        fns.append(padding_mask_function(attention_mask.bool()))
    out = torch.zeros(B, len(q_slots), len(k_slots), dtype=torch.bool)
    for b in range(B):
        for i, q in enumerate(q_slots.tolist()):
            for j, k in enumerate(k_slots.tolist()):
                out[b, i, j] = k >= 0 and all(bool(fn(b, 0, q, k)) for fn in fns)
    return out


def ring(past: int, window: int, n_new: int) -> torch.Tensor:
    """Key slots a sliding-window cache returns: the ring (slot s at index s % window) then new slots."""
    slots = torch.full((window,), -1)
    for s in range(max(0, past - window), past):
        slots[s % window] = s
    return torch.cat((slots, torch.arange(past, past + n_new)))


# (q_slots, k_slots) of the situations a decoder meets: prefill, chunk after a cache, one-token decode,
# and a sliding-window ring (unordered, partly empty).
SLOTS = {
    "prefill": (torch.arange(9), torch.arange(9)),
    "chunk": (torch.arange(5, 9), torch.arange(9)),
    "decode": (torch.tensor([8]), torch.arange(9)),
    "ring-partial": (torch.arange(3, 6), ring(3, 4, 3)),
    "ring-full": (torch.arange(11, 13), ring(11, 4, 2)),
    "ring-decode": (torch.tensor([20]), ring(20, 4, 1)),
}


# A bidirectional window is left out: qkv's is one-sided today (no lower bound on future keys).
CASES = [(c, w) for c in (True, False) for w in (None, 1, 3, 4, 20) if c or w is None]


@pytest.mark.parametrize("slots", SLOTS)
@pytest.mark.parametrize(("causal", "window"), CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_mask_allows_exactly_the_reference_pairs(slots, causal, window, padded):
    q_slots, k_slots = SLOTS[slots]
    B, L = 2, int(max(q_slots.max(), k_slots.max())) + 1
    attention_mask = torch.ones(B, L, dtype=torch.long)
    if padded:
        attention_mask[0, :2] = 0  # left padding
        attention_mask[1, L // 2] = 0  # a hole, as a packed or edited batch may have
    mask = build_attention_mask(q_slots, k_slots, causal=causal, attention_mask=attention_mask, window=window)
    got = allowed_pairs(mask, B, len(q_slots), len(k_slots))
    assert torch.equal(got, reference_pairs(q_slots, k_slots, causal, attention_mask, window, B))


def test_fast_paths_are_taken_when_exact():
    T = torch.arange(6)
    assert build_attention_mask(T, T, causal=True) == AttentionMask(None, is_causal=True)
    assert build_attention_mask(T, T, causal=False) == AttentionMask(None)
    # one new token after a cache sees every earlier key
    assert build_attention_mask(torch.tensor([5]), T, causal=True) == AttentionMask(None)
    # an all-ones attention mask is no padding; a window wider than the sequence is no window
    ones = torch.ones(1, 6, dtype=torch.long)
    assert build_attention_mask(T, T, causal=True, attention_mask=ones, window=6).is_causal
    # a prompt's chunk after the keys cached before it: the queries are the last of the keys
    chunk = build_attention_mask(torch.arange(2, 6), torch.arange(6), causal=True)
    assert chunk.bias is None and chunk.is_causal


@pytest.mark.parametrize(
    ("q_slots", "k_slots", "kwargs"),
    [
        (torch.arange(6), torch.arange(6), {"window": 5}),  # window binds: 5 - 0 >= 5
        (torch.arange(2, 5), torch.arange(6), {}),  # queries that are not the last keys
        (torch.arange(2, 6), torch.tensor([0, 1, 3, 2, 4, 5]), {}),  # keys out of order
        (torch.arange(6), torch.arange(6), {"attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1]])}),
        (torch.tensor([3]), ring(3, 4, 1), {}),  # an empty ring slot must stay hidden
        (torch.arange(6), torch.arange(6), {"position_bias": torch.zeros(1, 2, 6, 6)}),
    ],
)
def test_fast_paths_are_not_taken_when_they_would_be_wrong(q_slots, k_slots, kwargs):
    mask = build_attention_mask(q_slots, k_slots, causal=True, **kwargs)
    assert mask.bias is not None and not mask.is_causal


def test_sliding_window_follows_the_hf_convention():
    """Query i sees keys j with i - window < j <= i: `window` keys including itself (Mistral)."""
    n, window = 10, 3
    mask = build_attention_mask(torch.arange(n), torch.arange(n), causal=True, window=window)
    got = allowed_pairs(mask, 1, n, n)[0]
    for i in range(n):
        assert got[i].nonzero().flatten().tolist() == list(range(max(0, i - window + 1), i + 1))


def test_position_bias_is_added_to_allowed_pairs_and_masked_rows_stay_finite():
    q = k = torch.arange(4)
    slopes = torch.tensor([0.5, 0.25])
    position_bias = alibi_bias(slopes, q, k)
    attention_mask = torch.tensor([[0, 1, 1, 1]])
    mask = build_attention_mask(q, k, causal=True, attention_mask=attention_mask, position_bias=position_bias)
    assert mask.bias.shape == (1, 2, 4, 4)
    assert torch.isfinite(mask.bias).all()  # query 0 sees nothing; finfo.min keeps softmax NaN-free
    allowed = allowed_pairs(mask, 1, 4, 4)[0]
    torch.testing.assert_close(mask.bias[0][:, allowed], position_bias[0][:, allowed])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_dtype_and_masked_value(dtype):
    mask = build_attention_mask(torch.arange(3), torch.arange(3), causal=True, window=1, dtype=dtype)
    assert mask.bias.dtype == dtype
    assert mask.bias[0, 0, 1, 0] == torch.finfo(dtype).min
    assert mask.bias[0, 0, 1, 1] == 0


def test_alibi_bias_is_minus_slope_times_distance():
    """Press et al. 2022 §3: bias(h, i, j) = -m_h * (i - j) for keys j <= i."""
    slopes = torch.tensor([0.5, 0.125])
    q, k = torch.arange(3, 6), torch.arange(6)
    bias = alibi_bias(slopes, q, k)
    assert bias.shape == (1, 2, 3, 6)
    for h, m in enumerate(slopes.tolist()):
        for a, i in enumerate(q.tolist()):
            for j in range(i + 1):
                assert bias[0, h, a, j].item() == pytest.approx(-m * (i - j))
