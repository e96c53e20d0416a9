"""Head statistics: entropy and mean attention distance, against sums written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.interpret import head_statistics
from qkv.viz import attention_maps
from tiny_models import random_ids, tiny_model


def test_one_hot_and_uniform_heads():
    T = 5
    previous = torch.zeros(T, T)  # head 0: each token looks at the one before it (the first at itself)
    for i in range(T):
        previous[i, max(i - 1, 0)] = 1
    uniform = torch.tril(torch.ones(T, T))  # head 1: uniform over the causal prefix
    uniform = uniform / uniform.sum(-1, keepdim=True)
    stats = head_statistics(torch.stack([previous, uniform])[None])
    assert stats.entropy.shape == stats.distance.shape == (1, 2)
    assert stats.entropy[0, 0].item() == 0
    assert stats.entropy[0, 1].item() == pytest.approx(sum(math.log(i + 1) for i in range(T)) / T, abs=1e-6)
    assert stats.distance[0, 0].item() == pytest.approx((T - 1) / T)  # one step back, except the first row
    assert stats.distance[0, 1].item() == pytest.approx(sum(i / 2 for i in range(T)) / T)  # mean of 0..i is i/2


def test_model_weights_and_a_subset_of_rows():
    model = tiny_model("tiny-llama", n_layers=2)
    weights = attention_maps(model, random_ids(512, 1, 7, seed=0))
    stats = head_statistics(weights)
    w = weights.double()
    for layer in range(2):
        for head in range(4):
            rows = w[layer, head]
            ent = sum(-sum(p * math.log(p) for p in row.tolist() if p > 0) for row in rows) / 7
            dist = sum(sum(p * abs(i - j) for j, p in enumerate(row.tolist())) for i, row in enumerate(rows)) / 7
            assert stats.entropy[layer, head].item() == pytest.approx(ent, abs=1e-5)
            assert stats.distance[layer, head].item() == pytest.approx(dist, abs=1e-5)
    picked = torch.tensor([2, 6])  # rows given by position, as the explorer ships for long prompts
    sub = head_statistics(weights[:, :, picked], query_positions=picked)
    manual = head_statistics(weights[:, :, [2]], query_positions=torch.tensor([2])).distance
    manual = (manual + head_statistics(weights[:, :, [6]]).distance) / 2  # the last row by default
    assert torch.allclose(sub.distance, manual, atol=1e-6)
    assert head_statistics(weights, with_distance=False).distance is None


def test_distance_on_a_grid():
    """Four patches on a 2 x 2 grid, each looking at the one diagonally across: sqrt(2) patches away."""
    across = torch.tensor([3, 2, 1, 0])
    weights = torch.nn.functional.one_hot(across, 4).double()[None, None]
    grid = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert head_statistics(weights, coords=grid).distance.item() == pytest.approx(math.sqrt(2))
    assert head_statistics(weights).distance.item() == pytest.approx((3 + 1 + 1 + 3) / 4)  # in sequence indices


def test_bad_shapes():
    with pytest.raises(ValueError, match="layers, heads, rows, keys"):
        head_statistics(torch.ones(3, 3))
    with pytest.raises(ValueError, match="one position per row"):
        head_statistics(torch.ones(1, 1, 2, 4) / 4, query_positions=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="coords"):
        head_statistics(torch.ones(1, 1, 2, 4) / 4, coords=torch.zeros(3, 2))
