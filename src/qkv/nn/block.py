"""One transformer layer: self-attention (+ cross-attention) + MLP with pre- or post-norm residuals."""

from __future__ import annotations

import torch
from torch import nn

from qkv.config import ModelConfig
from qkv.nn.attention import Attention, AttentionInputs
from qkv.nn.mlp import MLP
from qkv.nn.norm import make_norm


class Block(nn.Module):
    """Pre-norm: x + f(norm(x)) (GPT-2, LLaMA). Post-norm: norm(x + f(x)) (Vaswani et al., BERT).

    Causality is not a property of the block: the model builds the masks (causal for decoders,
    padding-only for encoders) and hands them over in `AttentionInputs`.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, cross_attention: bool = False):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        if cross_attention:
            self.cross_norm = make_norm(cfg)
            self.cross_attn = Attention(cfg, layer_idx, cross=True)
        else:
            self.cross_norm = self.cross_attn = None
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, fn) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_norm:
            out, weights = fn(norm(x))
            return x + self.drop(out), weights
        out, weights = fn(x)
        return norm(x + self.drop(out)), weights

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttentionInputs,
        context: torch.Tensor | None = None,
        context_inputs: AttentionInputs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x: [B, T, D] -> (x, self-attention weights, cross-attention weights)."""
        x, self_weights = self._residual(x, self.attn_norm, lambda h: self.attn(h, inputs))
        cross_weights = None
        if self.cross_attn is not None:
            x, cross_weights = self._residual(
                x, self.cross_norm, lambda h: self.cross_attn(h, context_inputs or inputs, context)
            )
        x, _ = self._residual(x, self.mlp_norm, lambda h: (self.mlp(h), None))
        return x, self_weights, cross_weights
