"""Input embeddings: tokens, absolute positions (learned or sinusoidal), token types, optional norm."""

from __future__ import annotations

import torch
from torch import nn

from qkv.config import ModelConfig
from qkv.nn.norm import make_norm
from qkv.nn.position import sinusoidal_table


class Embeddings(nn.Module):
    """token + position (+ token type) embeddings, then optional LayerNorm (BERT) and dropout.

    RoPE, ALiBi and T5 positions act inside attention, so for them only tokens are embedded here.
    `scale` multiplies token embeddings by sqrt(d_model) as in Vaswani et al. 2017 §3.4 when set.
    """

    def __init__(self, cfg: ModelConfig, scale: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        else:
            self.sinusoid = None
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = cfg.d_model**0.5 if scale else 1.0

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the sinusoid table (e.g. after building on the meta device)."""
        if self.sinusoid is not None:
            self.sinusoid = sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model).to(device)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids: [B, T] -> [B, T, D]."""
        x = self.tokens(input_ids)
        if self.scale != 1.0:
            x = x * self.scale
        if self.positions is not None:
            x = x + self.positions(position_ids)
        elif self.sinusoid is not None:
            x = x + self.sinusoid[position_ids].to(x.dtype)
        if self.token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_types(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)
