"""`EncoderDecoder`: two stacks — a bidirectional encoder and a causal decoder that cross-attends
to it — sharing one token embedding (the original Transformer, T5, BART, Marian).

The families differ only in `ModelConfig` data: norms and their position, the FFN, positions
(sinusoidal in either layout, learned with an offset, T5's relative buckets), embedding scaling,
T5's rescaled tied head and BART's final logits bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkv.cache import KVCache
from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models.output import ModelOutput
from qkv.models.stack import StackOutput, TransformerStack
from qkv.nn.linear import Linear


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher forcing: the decoder reads [start, y_1 .. y_{n-1}] to predict [y_1 .. y_n]; -100 -> pad."""
    shifted = labels.new_full(labels.shape, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_id)


class EncoderDecoder(nn.Module):
    """`forward(input_ids [B, S], decoder_input_ids [B, T]) -> ModelOutput(logits [B, T, V], ...)`."""

    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.family != "seq2seq":
            raise ValueError(f"EncoderDecoder needs a config with family='seq2seq', got {cfg.family!r}")
        super().__init__()
        self.config = cfg
        self.tokenizer: Any = None  # set by loaders when the source carries one
        self.encoder = TransformerStack(cfg, causal=False)
        self.decoder = TransformerStack(cfg, causal=True, cross_attention=True, n_layers=cfg.n_decoder_layers)
        self.decoder.embed.tokens = self.encoder.embed.tokens  # one vocabulary for source and target
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.encoder.embed.tokens.weight
        if cfg.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(1, cfg.vocab_size))
        else:
            self.final_logits_bias = None
        if not self.lm_head.weight.is_meta:  # built on meta to be loaded: skip the random init
            self.apply(TransformerStack.init_weights)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def new_cache(self, batch_size: int, max_len: int | None = None, static: bool = False) -> KVCache:
        """A cache for the decoder's self-attention plus the cross-attention context (`KVCache.set_context`)."""
        if static:
            raise UsageError("the static (compiled) decode step does not support encoder-decoder models yet")
        return self.decoder.new_cache(batch_size, max_len or self.config.max_seq_len)

    def decoder_start_ids(self, batch_size: int) -> torch.Tensor:
        """[B, 1] of `decoder_start_token_id`, where every generated sequence begins."""
        start = self.config.decoder_start_token_id
        if start is None:
            raise UsageError("this model has no decoder_start_token_id; set it in its config to generate")
        return torch.full((batch_size, 1), start, dtype=torch.long, device=self.device)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        attention_rows: int | Sequence[int] | torch.Tensor | None = None,
        attention_layers: int | Sequence[int] | None = None,
    ) -> StackOutput:
        """Run the encoder over input_ids [B, S]; with a cache, keep the output for cross-attention.
        attention_rows / attention_layers: as in `TransformerStack.run`, over the source."""
        out = self.encoder.run(
            input_ids, attention_mask, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            attention_rows=attention_rows, attention_layers=attention_layers,
        )  # fmt: skip
        if cache is not None:
            padded = attention_mask is not None and not bool(attention_mask.all())
            cache.set_context(out.last_hidden_state, attention_mask if padded else None)
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.scale_decoder_output:
            x = x * self.config.d_model**-0.5  # T5 v1.0 (Raffel et al. 2020): the tied head reads rescaled states
        logits = self.lm_head(x)
        return logits + self.final_logits_bias if self.final_logits_bias is not None else logits

    def decode(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, V] of decoder tokens [B, T] after what the cache holds (its context set by
        `encode`): the step every decoding path runs (`qkv.models.protocol.GenerativeModel`)."""
        out = self.decoder.run(input_ids, attention_mask, position_ids, cache, input_pos)
        x = out.last_hidden_state
        return self._logits(x[:, -logits_to_keep:] if logits_to_keep else x)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_output: StackOutput | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        attention_rows: int | Sequence[int] | torch.Tensor | None = None,
        attention_layers: int | Sequence[int] | None = None,
    ) -> ModelOutput:
        """input_ids/attention_mask: the source [B, S]; decoder_input_ids [B, T] (default: labels
        shifted right after decoder_start_token_id); labels [B, T] (-100 ignored) give the
        (label-smoothed) cross-entropy. encoder_output reuses an earlier `encode`.
        attention_rows / attention_layers (with output_attentions=True; see `TransformerStack.run`)
        apply to each stack against its own length and layers: rows are source positions for
        encoder_attentions and target positions for attentions and cross_attentions."""
        cfg = self.config
        if decoder_input_ids is None:
            if labels is None:
                raise UsageError("give decoder_input_ids or labels (the decoder's input is the labels shifted right)")
            start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else 0
            decoder_input_ids = shift_right(labels, start, cfg.pad_token_id or 0)
        if encoder_output is None:
            if input_ids is None:
                raise UsageError("give input_ids (the source) or encoder_output from encode()")
            encoder_output = self.encode(
                input_ids, attention_mask, None, output_attentions, output_hidden_states,
                attention_rows=attention_rows, attention_layers=attention_layers,
            )  # fmt: skip
        enc = encoder_output.last_hidden_state
        if enc.shape[0] != decoder_input_ids.shape[0]:
            raise UsageError(
                f"the encoder input has {enc.shape[0]} rows but decoder_input_ids has {decoder_input_ids.shape[0]}; "
                "give one target per source"
            )
        out = self.decoder.run(
            decoder_input_ids, decoder_attention_mask, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, context=enc, context_mask=attention_mask,
            attention_rows=attention_rows, attention_layers=attention_layers,
        )  # fmt: skip
        logits = self._logits(out.last_hidden_state)
        loss = None
        if labels is not None:
            flat = logits.reshape(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, label_smoothing=cfg.label_smoothing)
        return ModelOutput(
            last_hidden_state=out.last_hidden_state, logits=logits, loss=loss, hidden_states=out.hidden_states,
            attentions=out.attentions, cross_attentions=out.cross_attentions,
            encoder_last_hidden_state=enc, encoder_hidden_states=encoder_output.hidden_states,
            encoder_attentions=encoder_output.attentions,
        )  # fmt: skip

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, **options: Any) -> torch.Tensor:
        """Decoder tokens [B, 1 + new] (starting with decoder_start_token_id) for sources input_ids
        [B, S]. See `qkv.generation.generate`."""
        from qkv.generation import generate

        return generate(self, input_ids, max_new_tokens, **options)
