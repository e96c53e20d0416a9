"""`DecoderLM`: the decoder-only language model (GPT-2, LLaMA, Mistral, Qwen2, SmolLM2, ...).

A causal `TransformerStack` plus an LM head (tied or untied); every family is the same module
configured by `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkv.cache import KVCache
from qkv.config import ModelConfig
from qkv.models.output import ModelOutput
from qkv.models.stack import TransformerStack, check_input_ids
from qkv.nn.linear import Linear

__all__ = ["DecoderLM", "check_input_ids", "early_exit_draft", "next_token_loss"]


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from logits[:, t]; label -100 is ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).long(), ignore_index=-100
    )


class DecoderLM(TransformerStack):
    """Causal language model. `forward(input_ids [B, T]) -> ModelOutput(logits [B, T, V], ...)`."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.family != "decoder":
            raise ValueError(f"DecoderLM needs a config with family='decoder', got {cfg.family!r}")
        super().__init__(cfg, causal=True)
        self.tokenizer: Any = None  # set by loaders when the source carries one
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight
        if not self.lm_head.weight.is_meta:  # built on meta to be loaded: skip the random init
            self.apply(self.init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Run the model.

        input_ids: [B, T]; attention_mask: [B, past + T] of 1/0 (0 = padding); position_ids: [B, T]
        (default: past + arange(T)); labels: [B, T] for the shifted next-token loss; cache: a
        `KVCache` updated in place; input_pos: [T] slots to write when the cache is static;
        logits_to_keep: if > 0, compute logits for the last positions only.
        """
        out = self.run(
            input_ids, attention_mask, position_ids, cache, input_pos, output_attentions, output_hidden_states
        )
        x = out.last_hidden_state
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = next_token_loss(logits, labels) if labels is not None else None
        return ModelOutput(
            last_hidden_state=x, logits=logits, loss=loss, hidden_states=out.hidden_states, attentions=out.attentions
        )

    def decode(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, V] of input_ids [B, T] after what the cache holds: the step every decoding
        path runs (`qkv.models.protocol.GenerativeModel`)."""
        out = self(
            input_ids, attention_mask, position_ids, cache=cache, input_pos=input_pos, logits_to_keep=logits_to_keep
        )
        return out.logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, **options: Any) -> torch.Tensor:
        """Autoregressive generation with a KV cache -> [B, T + new]. See `qkv.generation.generate`."""
        from qkv.generation import generate  # generation depends on models, not the other way round

        return generate(self, input_ids, max_new_tokens, **options)


def early_exit_draft(model: DecoderLM, n_layers: int) -> DecoderLM:
    """A draft made of the model's first `n_layers` blocks plus its embeddings, final norm and LM
    head, sharing their weights (self-speculative decoding: Zhang et al. 2023, Draft & Verify;
    Elhoushi et al. 2024, LayerSkip)."""
    if not 1 <= n_layers <= model.config.n_layers:
        raise ValueError(f"n_layers={n_layers} must be between 1 and the model's {model.config.n_layers} layers")
    with torch.device("meta"):  # every part is replaced by the model's own below
        draft = DecoderLM(dataclasses.replace(model.config, n_layers=n_layers))
    draft.embed, draft.rope, draft.norm, draft.lm_head = model.embed, model.rope, model.norm, model.lm_head
    draft.blocks = nn.ModuleList(model.blocks[:n_layers])
    draft.reset_buffers(model.device)
    return draft.train(model.training)
