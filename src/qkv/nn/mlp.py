"""Position-wise feed-forward: plain (GELU/ReLU) or gated (SwiGLU/GeGLU, Shazeer 2020)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qkv.config import ModelConfig
from qkv.nn.linear import Linear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP (Radford et al. 2021), after Hendrycks & Gimpel
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """down(act(up(x))) or, gated, down(act(gate(x)) * up(x)).

    For gated variants the gate and up projections are one fused matrix `up` of shape
    [2 * d_ff, d_model] (gate rows first): one matmul instead of two on the hot path.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.mlp]
        self.d_ff = cfg.d_ff
        self.up = Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.mlp_bias)
        self.down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.split(self.d_ff, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(h)
