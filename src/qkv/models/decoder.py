"""`DecoderLM`: the decoder-only language model (GPT-2, LLaMA, Mistral, Qwen2, SmolLM2, ...).

Every family is the same module configured by `ModelConfig`: embeddings -> blocks -> final norm
-> LM head (tied or untied). The per-forward work shared by all layers (masks, RoPE tables) is
done once here and handed to each block in `AttentionInputs`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkv.cache import KVCache
from qkv.config import ModelConfig
from qkv.models.output import ModelOutput
from qkv.nn.attention import AttentionInputs
from qkv.nn.block import Block
from qkv.nn.embedding import Embeddings
from qkv.nn.linear import Linear
from qkv.nn.mask import AttentionMask, alibi_bias, build_attention_mask
from qkv.nn.norm import make_norm
from qkv.nn.position import RotaryEmbedding, alibi_slopes


def check_input_ids(input_ids: torch.Tensor, cfg: ModelConfig) -> None:
    """Raise a clear ValueError for ids a model cannot embed (wrong rank/dtype, negative, >= vocab)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
        bad = int(input_ids.max()) if int(input_ids.max()) >= cfg.vocab_size else int(input_ids.min())
        raise ValueError(
            f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); "
            "was the text encoded with this model's tokenizer?"
        )


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from logits[:, t]; label -100 is ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).long(), ignore_index=-100
    )


class DecoderLM(nn.Module):
    """Causal language model. `forward(input_ids [B, T]) -> ModelOutput(logits [B, T, V], ...)`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.family != "decoder":
            raise ValueError(f"DecoderLM needs a config with family='decoder', got {cfg.family!r}")
        self.config = cfg
        self.tokenizer: Any = None  # set by loaders when the source carries one
        self.embed = Embeddings(cfg)
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        if cfg.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight
        if not self.lm_head.weight.is_meta:  # built on meta to be loaded: skip the random init
            self.apply(self._init_weights)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (e.g. after building on the meta device)."""
        if self.config.position == "alibi":
            self.alibi_slopes = alibi_slopes(self.config.n_heads).to(device)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.embed.tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.tokens.weight.dtype

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this model (default length: the model's context)."""
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Run the model.

        input_ids: [B, T]; attention_mask: [B, past + T] of 1/0 (0 = padding); position_ids: [B, T]
        (default: past + arange(T)); labels: [B, T] for the shifted next-token loss; cache: a
        `KVCache` updated in place; logits_to_keep: if > 0, compute logits for the last positions only.
        """
        cfg = self.config
        check_input_ids(input_ids, cfg)
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if cfg.context_limit is not None and past + T > cfg.context_limit:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds the model's context of {cfg.max_seq_len} "
                "(max_seq_len); shorten the prompt or generate fewer tokens"
            )
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask must have shape [batch, past + seq_len] = {(B, past + T)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        x = self.embed(input_ids, position_ids)

        q_slots = torch.arange(past, past + T, device=device)
        k_slots = cache.key_slots(T) if cache is not None else q_slots
        inputs = AttentionInputs(cache=cache, need_weights=output_attentions)
        position_bias = alibi_bias(self.alibi_slopes, q_slots, k_slots) if cfg.position == "alibi" else None
        # One mask for all layers; every layer of a decoder shares the same window.
        inputs.masks["sliding" if cfg.sliding_window else "full"] = build_attention_mask(
            q_slots, k_slots, causal=True, attention_mask=attention_mask, window=cfg.sliding_window,
            position_bias=position_bias, dtype=x.dtype,
        )  # fmt: skip
        if self.rope is not None:
            cos, sin = self.rope(position_ids, x.dtype)  # (B, 1, T, rot)
            inputs.rope = (cos.transpose(1, 2), sin.transpose(1, 2))  # token-major, as attention applies it

        hidden_states: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        for block in self.blocks:
            if output_hidden_states:
                hidden_states.append(x)
            x, weights, _ = block(x, inputs)
            if output_attentions:
                attentions.append(weights)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = next_token_loss(logits, labels) if labels is not None else None
        return ModelOutput(
            last_hidden_state=x,
            logits=logits,
            loss=loss,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def static_step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, T, V] for input_ids [B, T] at slots input_pos [T] of a static `KVCache`.

        Every shape depends only on B, T and the cache size, and nothing reads a Python-side
        position, so one `torch.compile` of this method serves every decode step. No padding mask
        (left-padded batches use `forward`).
        """
        cfg = self.config
        B, T = input_ids.shape
        cache.input_pos = input_pos
        x = self.embed(input_ids, input_pos.expand(B, T))
        slots = torch.arange(cache.max_len, device=input_ids.device)
        allowed = slots[None, :] <= input_pos[:, None]  # (T, S)
        if cfg.sliding_window:
            allowed = allowed & (input_pos[:, None] - slots[None, :] < cfg.sliding_window)
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~allowed, torch.finfo(x.dtype).min)[None, None]  # (1, 1, T, S)
        if cfg.position == "alibi":
            bias = bias + alibi_bias(self.alibi_slopes, input_pos, slots).to(x.dtype)
        inputs = AttentionInputs(cache=cache)
        inputs.masks["sliding" if cfg.sliding_window else "full"] = AttentionMask(bias)
        if self.rope is not None:
            cos, sin = self.rope(input_pos.expand(B, T), x.dtype)
            inputs.rope = (cos.transpose(1, 2), sin.transpose(1, 2))
        for block in self.blocks:
            x = block(x, inputs)[0]
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        """Autoregressive generation with a KV cache -> [B, T + new]. See `qkv.generation.generate`."""
        from qkv.generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
