"""`DecoderLM`: the decoder-only language model (GPT-2, LLaMA, Mistral, Qwen2, SmolLM2, ...).

A causal `TransformerStack` plus an LM head (tied or untied); every family is the same module
configured by `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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


# How many logits the loss turns to float32 at a time (16M: 64 MB), whatever the batch and vocabulary.
LOSS_CHUNK = 1 << 24


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits [N, V] (any float dtype) against targets [N] (-100: ignored),
    computed in float32 a chunk of rows at a time.

    `F.cross_entropy(logits.float(), ...)` makes a float32 copy of the logits and keeps float32
    log-probabilities [N, V] from the forward pass to the backward one (twice the size of bf16
    logits, and with a large vocabulary the largest tensor of the step). Here the backward pass
    recomputes softmax from the logits (which the caller holds anyway) and the log-sum-exp [N]
    saved by the forward pass, so nothing [N, V] is kept beyond the logits; their gradient has
    their dtype, as autograd's would.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != -100
        picked = targets.masked_fill(~valid, 0)[:, None]
        rows = max(1, LOSS_CHUNK // max(1, logits.shape[-1]))
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows].float()
            lse[start : start + rows] = torch.logsumexp(chunk, dim=-1)
            nll = lse[start : start + rows] - chunk.gather(1, picked[start : start + rows]).squeeze(1)
            total += nll.masked_fill(~valid[start : start + rows], 0.0).sum()
        count = valid.sum()
        ctx.save_for_backward(logits, picked, valid, lse, count)
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, picked, valid, lse, count = ctx.saved_tensors
        out = torch.empty_like(logits)
        rows = max(1, LOSS_CHUNK // max(1, logits.shape[-1]))
        # d(mean nll)/d logits = (softmax - one_hot(target)) / count on the rows that count.
        scale = (grad / count).float()
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            probs = logits[start:end].float().sub_(lse[start:end, None]).exp_()
            probs.scatter_add_(1, picked[start:end], torch.full_like(probs[:, :1], -1.0))
            probs.mul_(valid[start:end, None] * scale)
            out[start:end] = probs
        return out, None


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from logits[:, t]; label -100 is ignored.

    logits: [B, T, V], labels: [B, T]. The targets are shifted rather than the logits (the last
    position gets -100), so the logits are never copied; see `_CrossEntropy` for the memory it saves.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1).long()
    logits = logits.reshape(-1, logits.shape[-1])
    if torch.compiler.is_compiling():  # inductor fuses the cast into the loss and plans the memory itself
        return F.cross_entropy(logits.float(), targets, ignore_index=-100)
    return _CrossEntropy.apply(logits, targets)


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
        attention_rows: int | Sequence[int] | torch.Tensor | None = None,
        attention_layers: int | Sequence[int] | None = None,
    ) -> ModelOutput:
        """Run the model.

        input_ids: [B, T]; attention_mask: [B, past + T] of 1/0 (0 = padding); position_ids: [B, T]
        (default: past + arange(T)); labels: [B, T] for the shifted next-token loss; cache: a
        `KVCache` updated in place; input_pos: [T] slots to write when the cache is static;
        logits_to_keep: if > 0, compute logits for the last positions only.
        attention_rows / attention_layers (with output_attentions=True): the weights of those query
        positions alone, from beside the fast backend, and of those layers alone (None for the others);
        see `TransformerStack.run`.
        """
        out = self.run(
            input_ids, attention_mask, position_ids, cache, input_pos, output_attentions, output_hidden_states,
            attention_rows=attention_rows, attention_layers=attention_layers,
        )  # fmt: skip
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
