"""What kind of head is this? Each head's attention entropy and mean attention distance.

A head with low entropy looks at few tokens (previous-token, first-token "sink" heads); a high
mean distance reads far back. Mean attention distance follows Dosovitskiy et al. 2020 (ViT, §4.5,
Fig. 7): the distance between query and key weighted by the attention weight, averaged over queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkv.errors import UsageError


@dataclass(frozen=True)
class HeadStatistics:
    """entropy: [L, H] mean entropy of a query row's weights, in nats (0: one key; ln S: uniform);
    distance: [L, H] mean over query rows of sum_j w_ij |pos_i - pos_j|, in tokens (None for
    cross-attention, where queries and keys are different sequences)."""

    entropy: torch.Tensor
    distance: torch.Tensor | None


def head_statistics(
    weights: torch.Tensor,
    query_positions: torch.Tensor | None = None,
    with_distance: bool = True,
    coords: torch.Tensor | None = None,
) -> HeadStatistics:
    """Per-head statistics of attention weights [L, H, R, S] (R query rows over S keys).

    query_positions: [R] the key index of each row (default: the rows are the last R positions,
    which is all of them for a full self-attention map); with_distance=False for cross-attention;
    coords: [S, d] where each key sits, for the distance (default: its index, so the distance is in
    tokens; a ViT's patches: their (row, column) on the patch grid).
    """
    if weights.dim() != 4:
        raise UsageError(f"head_statistics takes weights [layers, heads, rows, keys], got {tuple(weights.shape)}")
    R, S = weights.shape[-2:]
    w = weights.double()
    entropy = -torch.special.xlogy(w, w).sum(-1).mean(-1)  # 0 log 0 = 0
    if not with_distance:
        return HeadStatistics(entropy.float(), None)
    if query_positions is None:
        query_positions = torch.arange(S - R, S)
    if query_positions.shape != (R,):
        raise UsageError(f"query_positions must hold one position per row ({R}), got {tuple(query_positions.shape)}")
    coords = torch.arange(S, dtype=torch.float64)[:, None] if coords is None else coords.double()
    if coords.dim() != 2 or coords.shape[0] != S:
        raise UsageError(f"coords must be [keys, dims] = [{S}, d], got {tuple(coords.shape)}")
    gap = torch.cdist(coords[query_positions], coords)  # [R, S], Euclidean (|i - j| for token indices)
    distance = (w * gap).sum(-1).mean(-1)
    return HeadStatistics(entropy.float(), distance.float())
