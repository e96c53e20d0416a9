"""Input embeddings: tokens, absolute positions (learned or sinusoidal), token types, optional norm."""

from __future__ import annotations

import torch
from torch import nn

from qkv.config import ModelConfig
from qkv.nn.linear import Linear
from qkv.nn.norm import make_norm
from qkv.nn.position import sinusoidal_table


class Embeddings(nn.Module):
    """token + position (+ token type) embeddings, then optional LayerNorm (BERT), dropout, and a
    projection up to d_model when `embedding_size` is smaller (ELECTRA's `embeddings_project`).

    RoPE, ALiBi and T5 positions act inside attention, so for them only tokens are embedded here.
    Learned position ids are shifted by `position_offset` (RoBERTa keeps the rows below it for
    padding). `scale_embeddings` multiplies token embeddings by sqrt(d_model) (Vaswani et al. 2017 §3.4).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embedding_size
        self.offset = cfg.position_offset
        self.tokens = nn.Embedding(cfg.vocab_size, dim)
        self.positions = nn.Embedding(cfg.max_seq_len + self.offset, dim) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            table = sinusoidal_table(cfg.max_seq_len, dim, layout=cfg.sinusoid_layout)
            self.register_buffer("sinusoid", table, persistent=False)
        else:
            self.sinusoid = None
        self.token_types = nn.Embedding(cfg.type_vocab_size, dim) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg, dim) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.project = Linear(dim, cfg.d_model) if dim != cfg.d_model else None
        self.scale = cfg.d_model**0.5 if cfg.scale_embeddings else 1.0

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the sinusoid table (e.g. after building on the meta device)."""
        if self.sinusoid is not None:
            cfg = self.cfg
            self.sinusoid = sinusoidal_table(cfg.max_seq_len, cfg.embedding_size, layout=cfg.sinusoid_layout).to(device)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids, token_type_ids: [B, T] -> [B, T, d_model]."""
        x = self.tokens(input_ids)
        if self.scale != 1.0:
            x = x * self.scale
        if self.positions is not None:
            x = x + self.positions(position_ids + self.offset if self.offset else position_ids)
        elif self.sinusoid is not None:
            x = x + self.sinusoid[position_ids].to(x.dtype)
        if self.token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_types(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        x = self.drop(x)
        return self.project(x) if self.project is not None else x
