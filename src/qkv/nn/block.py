"""One transformer layer: self-attention (+ cross-attention) + MLP with pre- or post-norm residuals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        self.dropout = cfg.dropout  # on the residual branches, in training only

    def _residual(self, x: torch.Tensor, out: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Add a sub-layer's output to the stream (pre-norm already normalised its input)."""
        if self.training and self.dropout:
            out = F.dropout(out, self.dropout)
        return x + out if self.pre_norm else norm(x + out)

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttentionInputs,
        context: torch.Tensor | None = None,
        context_inputs: AttentionInputs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x: [B, T, D] -> (x, self-attention weights, cross-attention weights)."""
        pre = self.pre_norm
        out, self_weights = self.attn(self.attn_norm(x) if pre else x, inputs)
        x = self._residual(x, out, self.attn_norm)
        cross_weights = None
        if self.cross_attn is not None:
            out, cross_weights = self.cross_attn(self.cross_norm(x) if pre else x, context_inputs or inputs, context)
            x = self._residual(x, out, self.cross_norm)
        x = self._residual(x, self.mlp(self.mlp_norm(x) if pre else x), self.mlp_norm)
        return x, self_weights, cross_weights
