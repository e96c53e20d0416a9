"""The one output type every qkv model returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """What a forward pass returns; fields a model does not compute stay None."""

    last_hidden_state: torch.Tensor  # [B, T, D]
    logits: torch.Tensor | None = None  # [B, T, V] (LM/MLM), [B, C] (classification), [B, T, C] (tokens), [B, T] (RTD)
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layers + 1 tensors [B, T, D]
    # n_layers tensors [B, H, T, S]; [B, H, R, S] for R attention_rows; None for a layer outside attention_layers
    attentions: tuple[torch.Tensor | None, ...] | None = None
    cross_attentions: tuple[torch.Tensor | None, ...] | None = None  # the same, decoder -> encoder: [B, H, T, S_src]
    pooler_output: torch.Tensor | None = None  # [B, D] (encoders with a pooler: BERT)
    # Encoder-decoder models: the decoder's outputs above, the encoder's here.
    encoder_last_hidden_state: torch.Tensor | None = None  # [B, S, D]
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor | None, ...] | None = None
