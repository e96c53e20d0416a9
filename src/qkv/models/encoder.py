"""`Encoder`: the bidirectional encoder (BERT, RoBERTa, ELECTRA, sentence-embedding models).

A non-causal `TransformerStack`, an optional pooler and one optional head, all chosen by
`ModelConfig` (`head`, `pooler`, `classifier`). BERT, RoBERTa and ELECTRA differ only in config
data: token types, position offset and padding-skipping positions, embedding size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models.heads import HEAD_CLASSES, Pooler, check_labels, head_loss
from qkv.models.output import ModelOutput
from qkv.models.stack import TransformerStack


class Encoder(TransformerStack):
    """`forward(input_ids [B, T], attention_mask, token_type_ids) -> ModelOutput(last_hidden_state,
    pooler_output, logits of the head)`."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.family != "encoder":
            raise ValueError(f"Encoder needs a config with family='encoder', got {cfg.family!r}")
        super().__init__(cfg, causal=False)
        self.tokenizer: Any = None  # set by loaders when the source carries one
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.head = HEAD_CLASSES[cfg.head](cfg) if cfg.head != "none" else None
        if cfg.head == "mlm" and cfg.tie_embeddings:
            self.head.decoder.weight = self.embed.tokens.weight
        if not self.embed.tokens.weight.is_meta:  # built on meta to be loaded: skip the random init
            self.apply(self.init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        attention_rows: int | Sequence[int] | torch.Tensor | None = None,
        attention_layers: int | Sequence[int] | None = None,
    ) -> ModelOutput:
        """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids: [B, T].

        labels: [B, T] token ids (mlm, -100 = not predicted), [B] classes (classification),
        [B, T] labels (token_classification, -100 ignored), [B, T] 0/1 replaced (rtd).
        attention_rows / attention_layers (with output_attentions=True): the weights of those query
        positions alone, from beside the fast backend, and of those layers alone (None for the others);
        see `TransformerStack.run`.
        """
        out = self.run(
            input_ids, attention_mask, position_ids, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, token_type_ids=token_type_ids,
            attention_rows=attention_rows, attention_layers=attention_layers,
        )  # fmt: skip
        x = out.last_hidden_state
        pooled = self.pooler(x) if self.pooler is not None else None
        logits = self.head(x, pooled) if self.head is not None else None
        loss = None
        if labels is not None:
            if logits is None:
                raise UsageError("labels need a head; this encoder has head='none' (load a model with a head)")
            check_labels(self.config, labels, logits)
            loss = head_loss(self.config.head, logits, labels, attention_mask)
        return ModelOutput(
            last_hidden_state=x, logits=logits, loss=loss, hidden_states=out.hidden_states,
            attentions=out.attentions, pooler_output=pooled,
        )  # fmt: skip

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Encoders do not generate text: say so rather than fail somewhere inside the decode loop."""
        raise UsageError(
            "an encoder (BERT-style, bidirectional) cannot generate text; use a decoder or encoder-decoder model, "
            "or use this one for embeddings, classification or masked-token prediction"
        )
