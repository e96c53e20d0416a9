"""`TransformerStack`: embeddings -> blocks -> final norm, the loop every family shares.

The per-forward work that all layers share is done once here: position ids, the attention masks
(one place builds them: `qkv.nn.mask.build_attention_mask`), the RoPE tables and the ALiBi bias.
The same code serves a prompt, a cached decode step and the static-shape (compiled) decode step;
the only difference is where the key slots come from (`KVCache.slots`). A family is this stack
plus a few lines of head code (`DecoderLM` adds the LM head).

Gradient checkpointing (`set_grad_checkpointing(model, True)`) trades compute for memory in
training: each block keeps only its input, and its activations are recomputed in the backward
pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qkv.cache import KVCache
from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.nn.attention import AttentionInputs
from qkv.nn.block import Block
from qkv.nn.embedding import Embeddings, PatchEmbedding
from qkv.nn.mask import alibi_bias, build_attention_mask
from qkv.nn.norm import make_norm
from qkv.nn.position import RelativePositionBias, RotaryEmbedding, alibi_slopes


def check_token_type_ids(token_type_ids: torch.Tensor, input_ids: torch.Tensor, cfg: ModelConfig) -> None:
    """token_type_ids must match input_ids and lie in [0, type_vocab_size)."""
    if not cfg.type_vocab_size:
        raise ValueError("this model has no token type embeddings (type_vocab_size=0); drop token_type_ids")
    if token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"token_type_ids must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(token_type_ids.shape)}"
        )
    low, high = int(token_type_ids.min()), int(token_type_ids.max())
    if low < 0 or high >= cfg.type_vocab_size:
        raise ValueError(
            f"token type id {high if high >= cfg.type_vocab_size else low} is outside [0, {cfg.type_vocab_size}) "
            "(type_vocab_size); BERT-style models take 0 for the first segment and 1 for the second"
        )


def padding_skipping_positions(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Learned position ids that skip padding (RoBERTa): the k-th real token of a row sits at
    k - 1 and every pad token at -1, so with `position_offset` = pad_id + 1 pads land on padding_idx."""
    real = input_ids != pad_token_id
    return (real.cumsum(-1) - 1).masked_fill(~real, -1)


def check_input_ids(input_ids: torch.Tensor, cfg: ModelConfig) -> None:
    """Raise a clear ValueError for ids a model cannot embed (wrong rank/dtype, empty, negative, >= vocab)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one sequence of one token"
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
        bad = int(input_ids.max()) if int(input_ids.max()) >= cfg.vocab_size else int(input_ids.min())
        raise ValueError(
            f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); "
            "was the text encoded with this model's tokenizer?"
        )


def resolve_indices(values: int | Sequence[int] | torch.Tensor, n: int, name: str, what: str) -> list[int]:
    """`values` (an int or a sequence of ints; negative counts from the end, as in Python) as
    indices in [0, n); a UsageError naming the valid range for any outside [-n, n)."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.dim() > 1:
            raise UsageError(f"{name} must be integers (one index or a 1-D list), got a tensor of {values.dtype}")
        values = values.tolist()
    items = [values] if isinstance(values, int) else list(values)
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise UsageError(f"{name} must be a non-empty list of integers (negative counts from the end), got {values!r}")
    bad = [v for v in items if not -n <= v < n]
    if bad:
        raise UsageError(
            f"{name} {bad} out of range: this forward has {n} {what}, so valid indices are "
            f"{-n}..{n - 1} (negative counts from the end)"
        )
    return [v % n for v in items]


@dataclass
class StackOutput:
    """The final hidden states [B, T, D] and, on request, every layer's input and attention weights."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layers + 1 tensors [B, T, D]
    # n_layers entries [B, H, T, S] ([B, H, R, S] for R attention_rows; None for a layer left out
    # of attention_layers)
    attentions: tuple[torch.Tensor | None, ...] | None = None
    cross_attentions: tuple[torch.Tensor | None, ...] | None = None  # the same, over the context: [.., S_context]


class TransformerStack(nn.Module):
    """Embeddings, `n_layers` blocks and the final norm (pre-norm models), causal or bidirectional."""

    def __init__(
        self, cfg: ModelConfig, causal: bool = True, cross_attention: bool = False, n_layers: int | None = None
    ) -> None:
        super().__init__()
        self.config = cfg
        self.causal = causal
        self.cross_attention = cross_attention
        self.embed = PatchEmbedding(cfg) if cfg.family == "vit" else Embeddings(cfg)
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        if cfg.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)
        # T5 computes its relative bias in the first layer and shares it; here it belongs to the stack.
        self.relative_bias = RelativePositionBias(cfg, bidirectional=not causal) if cfg.position == "t5" else None
        self.blocks = nn.ModuleList(Block(cfg, i, cross_attention) for i in range(n_layers or cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.grad_checkpointing = False  # see set_grad_checkpointing

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (e.g. after building on the meta device)."""
        if self.config.position == "alibi":
            self.alibi_slopes = alibi_slopes(self.config.n_heads).to(device)

    def _first_parameter(self) -> torch.Tensor:
        # Token embeddings or the patch projection; the next one where the embeddings hold none
        # (a lookup from a tied packed head: `qkv.nn.packed_embedding`).
        return next(itertools.chain(self.embed.parameters(), self.parameters()))

    @property
    def device(self) -> torch.device:
        return self._first_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_parameter().dtype

    def new_cache(self, batch_size: int, max_len: int | None = None, static: bool = False) -> KVCache:
        """An empty KV cache for this model (default length: the model's context).

        static=True keeps every slot and is written at explicit positions (`input_pos`), so a
        decode step has the same shapes every time (for `torch.compile`).
        """
        return KVCache(
            self.config, batch_size, max_len or self.config.max_seq_len, self.dtype, self.device, static=static
        )

    def _check(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        token_type_ids: torch.Tensor | None,
    ) -> None:
        cfg = self.config
        check_input_ids(input_ids, cfg)
        if token_type_ids is not None:
            check_token_type_ids(token_type_ids, input_ids, cfg)
        if cache is not None and cache.static:
            return  # written at explicit slots; the cache's size bounds them
        past = cache.pos if cache is not None else 0
        B, T = input_ids.shape
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

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        token_type_ids: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_rows: int | Sequence[int] | torch.Tensor | None = None,
        attention_layers: int | Sequence[int] | torch.Tensor | None = None,
    ) -> StackOutput:
        """Run the stack over input_ids [B, T].

        attention_mask: [B, past + T] of 1/0 (0 = padding); position_ids: [B, T] (default: the
        query slots); cache: a `KVCache`, advanced in place; input_pos: [T] slots to write in a
        static cache, or [B, T] to give each row its own slots (a slot cache, `qkv.serve`);
        token_type_ids: [B, T] segment ids (BERT); context [B, S, D] and context_mask [B, S]: what
        cross-attention reads (default: the cache's, see `KVCache.set_context`); inputs_embeds
        [B, T, D]: inputs embedded already (ViT's patches), in place of input_ids.
        output_attentions returns every layer's weights [B, H, T, S] from the eager backend;
        attention_rows (query positions of this call, negative from the end) keeps the fast backend
        and returns the weights [B, H, R, S] of those rows alone, in O(R x S) memory;
        attention_layers (negative from the end) returns weights for those layers and None for the
        others. Both need output_attentions=True. Inside a compiled graph the checks that read
        tensor values are skipped (they would break the graph); the eager prefill before it has
        checked the prompt.
        """
        if inputs_embeds is None and not torch.compiler.is_compiling():
            self._check(input_ids, attention_mask, cache, token_type_ids)
        B, T = inputs_embeds.shape[:2] if inputs_embeds is not None else input_ids.shape
        device = inputs_embeds.device if inputs_embeds is not None else input_ids.device
        static = cache is not None and cache.static
        if input_pos is not None and input_pos.dim() == 2 and self.relative_bias is not None:
            raise ValueError("per-row input_pos [B, T] is not supported with T5 relative position buckets")
        q_slots, k_slots = cache.slots(T, input_pos) if cache is not None else (torch.arange(T, device=device),) * 2
        cfg = self.config
        if position_ids is None and cfg.positions_skip_padding:
            position_ids = padding_skipping_positions(input_ids, cfg.pad_token_id)
        elif position_ids is None:
            position_ids = q_slots.expand(B, T)
        x = inputs_embeds if inputs_embeds is not None else self.embed(input_ids, position_ids, token_type_ids)
        inputs = AttentionInputs(cache=cache, input_pos=input_pos, need_weights=output_attentions)
        static_mask = static  # a dense mask of fixed shape: what a compiled step over a static cache needs
        if static and T > 1 and input_pos.dim() == 1 and not torch.compiler.is_compiling():
            # An eager prompt chunk written at consecutive slots of a static cache attends to the
            # slots written so far only: the causal mask would hide the rest, and without them the
            # chunk gets the causal kernels instead of a dense mask over the whole buffer.
            start = int(input_pos[0])
            if torch.equal(input_pos, torch.arange(start, start + T, device=input_pos.device)):
                inputs.key_limit, static_mask = start + T, False
                k_slots = k_slots[: start + T]
        if attention_rows is not None or attention_layers is not None:
            self._select_weights(inputs, T, device, attention_rows, attention_layers)
        position_bias = None
        if cfg.position == "alibi":
            position_bias = alibi_bias(self.alibi_slopes, q_slots, k_slots)
        elif self.relative_bias is not None:
            position_bias = self.relative_bias(q_slots, k_slots)
        # One mask for all layers; every layer of a stack shares the same window.
        inputs.masks["sliding" if cfg.sliding_window else "full"] = build_attention_mask(
            q_slots, k_slots, causal=self.causal, attention_mask=attention_mask, window=cfg.sliding_window,
            position_bias=position_bias, dtype=x.dtype, static=static_mask,
        )  # fmt: skip
        if self.rope is not None:
            cos, sin = self.rope(position_ids, x.dtype)  # (B, 1, T, rot)
            inputs.rope = (cos.transpose(1, 2), sin.transpose(1, 2))  # token-major, as attention applies it
        if self.cross_attention:
            context, context_mask = self._context(context, context_mask, cache)
            S = context.shape[1] if context is not None else cache.cross_kv[0][0].shape[2]
            inputs.masks["cross"] = build_attention_mask(
                q_slots, torch.arange(S, device=x.device), causal=False, attention_mask=context_mask, dtype=x.dtype
            )

        hidden_states: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        cross_attentions: list[torch.Tensor] = []
        # Recompute in backward only where there is a backward: training, grad on, no cache.
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for block in self.blocks:
            if output_hidden_states:
                hidden_states.append(x)
            if recompute:
                # Non-reentrant: works with inputs that need no grad and with non-tensor arguments;
                # the RNG state is saved so dropout draws the same mask when recomputed.
                x, weights, cross_weights = checkpoint(block, x, inputs, context, use_reentrant=False)
            else:
                x, weights, cross_weights = block(x, inputs, context)
            if output_attentions:
                attentions.append(weights)
                cross_attentions.append(cross_weights)
        if cache is not None and not static:
            cache.advance(T)
        if not cfg.norm_pooled_only:
            x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return StackOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions and self.cross_attention else None,
        )

    def _select_weights(
        self,
        inputs: AttentionInputs,
        T: int,
        device: torch.device,
        rows: int | Sequence[int] | torch.Tensor | None,
        layers: int | Sequence[int] | torch.Tensor | None,
    ) -> None:
        """Set which query rows and which layers return attention weights (see `run`)."""
        if not inputs.need_weights:
            raise UsageError(
                "attention_rows and attention_layers choose which attention weights to return; "
                "pass output_attentions=True with them"
            )
        if rows is not None:
            rows = resolve_indices(rows, T, "attention_rows", "query positions")
            inputs.weight_rows = torch.tensor(rows, dtype=torch.long, device=device)
        if layers is not None:
            inputs.weight_layers = frozenset(resolve_indices(layers, len(self.blocks), "attention_layers", "layers"))

    @staticmethod
    def _context(
        context: torch.Tensor | None, context_mask: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The encoder output (and mask) that cross-attention reads: the argument, else the cache's."""
        if context is None and cache is not None and (cache.context is not None or cache.cross_kv):
            return cache.context, cache.context_mask
        if context is None:
            raise ValueError("cross-attention needs the encoder output: pass context= or a cache with set_context()")
        return context, context_mask


def set_grad_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn gradient checkpointing on or off in every `TransformerStack` of `model` (both stacks of an
    encoder-decoder, CLIP's towers, a model wrapped by a head or by LoRA).

    On: in training with grad enabled, each block's activations are dropped after its forward and
    recomputed in backward (less peak memory, roughly one more forward of compute). Evaluation,
    `torch.no_grad()` and cached decoding run as before.
    """
    stacks = [m for m in model.modules() if isinstance(m, TransformerStack)]
    if not stacks:
        raise ValueError(
            f"{type(model).__name__} holds no TransformerStack, so there are no blocks to checkpoint; "
            "pass a qkv model (DecoderLM, Encoder, EncoderDecoder, VisionTransformer, CLIP)"
        )
    for stack in stacks:
        stack.grad_checkpointing = bool(enabled)
