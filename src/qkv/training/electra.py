"""Replaced-token detection: ELECTRA's pre-training (Clark et al. 2020, "ELECTRA", §2).

A small generator (an `Encoder` with the MLM head) fills the masked positions of a masked-LM
batch by sampling from its output distribution; the discriminator (an `Encoder` with the "rtd"
head) reads the result and says, for every token, whether it was replaced. A sampled token that
equals the original counts as original. Both train at once on

    loss = mlm_loss(generator) + λ · bce_loss(discriminator),  λ = 50 (the paper's §3.1)

with no gradient through the sampling. They share the token, position and token-type embeddings
(and the embedding LayerNorm, as the paper's code does: §3.2 "weight sharing"). After training
the discriminator is the model: the `Trainer` saves it as the checkpoint (`checkpoint_model`) and
keeps the generator in training_state.pt, so a run resumes exactly.

    disc = Encoder(ModelConfig.from_name("electra-small", vocab_size=V))
    model = ReplacedTokenDetection(disc, Encoder(generator_config(disc.config)))
    Trainer(model, config, loader, val, collate=masker, accuracy=replaced_token_accuracy).train()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models import Encoder
from qkv.models.output import ModelOutput
from qkv.training.masking import IGNORE_INDEX

DISCRIMINATOR_WEIGHT = 50.0  # λ, Clark et al. 2020, §3.1
# Embedding parts the generator takes from the discriminator; each model keeps its own projection.
SHARED_EMBEDDINGS = ("tokens", "positions", "token_types", "norm")
# What must agree for the two models to share embeddings.
SHARED_FIELDS = (
    "vocab_size", "embedding_size", "max_seq_len", "position", "position_offset", "type_vocab_size", "embed_norm",
)  # fmt: skip


def generator_config(discriminator: ModelConfig, size: float = 0.25) -> ModelConfig:
    """The generator for a discriminator config: hidden and feed-forward widths × `size` (the paper
    finds 1/4–1/2 best, §3.2), the discriminator's head width (ELECTRA's code: heads = hidden / 64),
    the same depth and embedding size, and a tied MLM head."""
    if not 0.0 < size <= 1.0:
        raise UsageError(f"generator size={size} must be in (0, 1]; ELECTRA uses 1/4 of the discriminator")
    d_model = max(1, round(discriminator.d_model * size))
    n_heads = max(1, d_model // discriminator.head_dim)
    while d_model % n_heads:
        n_heads -= 1
    return discriminator.replace(
        d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, head_dim=d_model // n_heads,
        d_ff=max(1, round(discriminator.d_ff * size)), embedding_size=discriminator.embedding_size,
        head="mlm", tie_embeddings=True, pooler=False,
    )  # fmt: skip


@dataclass
class ReplacedTokenOutput(ModelOutput):
    """The discriminator's output (logits [B, T]: > 0 = replaced), plus both losses and the targets."""

    generator_loss: torch.Tensor | None = None
    discriminator_loss: torch.Tensor | None = None
    replaced: torch.Tensor | None = None  # [B, T] 0/1: the discriminator's labels
    attention_mask: torch.Tensor | None = None  # [B, T]: the positions the discriminator is scored on


class ReplacedTokenDetection(nn.Module):
    """Generator + discriminator, trained together by the `Trainer` on masked-LM batches.

    forward(input_ids, attention_mask, labels, token_type_ids) takes a `MaskedLMCollator` batch.
    """

    def __init__(self, discriminator: Encoder, generator: Encoder, disc_weight: float = DISCRIMINATOR_WEIGHT) -> None:
        super().__init__()
        d, g = discriminator.config, generator.config
        if d.head != "rtd" or g.head != "mlm":
            raise UsageError(
                f"ELECTRA needs a discriminator with head='rtd' and a generator with head='mlm', got "
                f"{d.head!r} and {g.head!r}; build them with cfg.replace(head=...) / generator_config(cfg)"
            )
        differ = [f"{f} ({getattr(d, f)} vs {getattr(g, f)})" for f in SHARED_FIELDS if getattr(d, f) != getattr(g, f)]
        if differ:
            raise UsageError(
                f"generator and discriminator must agree to share embeddings; they differ in {', '.join(differ)} "
                "(build the generator with generator_config(discriminator.config))"
            )
        self.discriminator = discriminator
        self.generator = generator
        self.disc_weight = disc_weight
        for name in SHARED_EMBEDDINGS:
            setattr(generator.embed, name, getattr(discriminator.embed, name))
        generator.head.decoder.weight = discriminator.embed.tokens.weight  # the MLM head stays tied

    @property
    def config(self) -> ModelConfig:
        """The discriminator's config: the model this training produces."""
        return self.discriminator.config

    @property
    def tokenizer(self) -> Any:
        return self.discriminator.tokenizer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ReplacedTokenOutput:
        """input_ids [B, T] with masked positions, labels [B, T]: originals there, -100 elsewhere."""
        if labels is None:
            raise UsageError("ReplacedTokenDetection needs labels= (a masked-LM batch: originals at chosen positions)")
        gen = self.generator(input_ids, attention_mask, token_type_ids, labels=labels)
        chosen = labels != IGNORE_INDEX
        with torch.no_grad():  # sampling is not differentiable; the generator learns from its MLM loss only
            probs = torch.softmax(gen.logits[chosen].float(), dim=-1)  # [N, V]
            original = torch.where(chosen, labels, input_ids)
            corrupted = original.masked_scatter(chosen, torch.multinomial(probs, 1).squeeze(1))
            replaced = (corrupted != original).long()
        disc = self.discriminator(corrupted, attention_mask, token_type_ids, labels=replaced)
        return ReplacedTokenOutput(
            last_hidden_state=disc.last_hidden_state, logits=disc.logits,
            loss=gen.loss + self.disc_weight * disc.loss, generator_loss=gen.loss.detach(),
            discriminator_loss=disc.loss.detach(), replaced=replaced, attention_mask=attention_mask,
        )  # fmt: skip

    # -- checkpoints (the Trainer's `SavesPart` protocol) ---------------------------------------------
    def checkpoint_model(self) -> Encoder:
        return self.discriminator

    def _generator_own_keys(self) -> list[str]:
        shared = (*(f"embed.{name}." for name in SHARED_EMBEDDINGS), "head.decoder.weight")
        return [k for k in self.generator.state_dict() if not k.startswith(shared)]

    def extra_state(self) -> dict[str, Any]:
        """The generator: its config and the weights it does not share with the discriminator."""
        weights = self.generator.state_dict()
        return {
            "generator_config": self.generator.config.to_dict(),
            "generator": {k: weights[k].detach().clone() for k in self._generator_own_keys()},
            "disc_weight": self.disc_weight,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        weights = state["generator"]
        missing = sorted(set(self._generator_own_keys()) - set(weights))
        if missing:
            raise UsageError(f"the saved generator lacks {', '.join(missing[:5])}: it was saved for another model")
        self.generator.load_state_dict(weights, strict=False)
        self.disc_weight = float(state["disc_weight"])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> ReplacedTokenDetection:
        """The generator + discriminator of an ELECTRA run's checkpoint (with its training state)."""
        from qkv.checkpoints.native import load_native, load_training_state

        state = load_training_state(path).get("model_extra")
        if state is None or "generator_config" not in state:
            raise UsageError(f"{path} holds no ELECTRA generator: it was not saved by an --objective rtd run")
        generator = Encoder(ModelConfig.from_dict(state["generator_config"]))
        model = cls(load_native(path), generator, float(state["disc_weight"]))
        model.load_extra_state(state)
        return model


def replaced_token_accuracy(batch: dict[str, torch.Tensor], out: ReplacedTokenOutput) -> tuple[int, int]:
    """(correct, counted) replaced/original calls of the discriminator over the real tokens."""
    keep = out.attention_mask.bool() if out.attention_mask is not None else torch.ones_like(out.replaced).bool()
    right = ((out.logits > 0).long() == out.replaced) & keep
    return int(right.sum()), int(keep.sum())


def all_original_accuracy(batch: dict[str, torch.Tensor], out: ReplacedTokenOutput) -> tuple[int, int]:
    """(correct, counted) of the baseline that calls every token original."""
    keep = out.attention_mask.bool() if out.attention_mask is not None else torch.ones_like(out.replaced).bool()
    return int(((out.replaced == 0) & keep).sum()), int(keep.sum())
