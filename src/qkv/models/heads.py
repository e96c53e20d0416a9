"""Heads that sit on an encoder stack, and sentence-embedding pooling.

Each head is a few lines over the stack's hidden states [B, T, D]; which one a model has is data
(`ModelConfig.head`, `classifier`, `pooler`). The activations follow the model's MLP activation
(`ACTIVATIONS[cfg.mlp]`), which is GELU in every BERT, RoBERTa and ELECTRA checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.nn.linear import Linear
from qkv.nn.mlp import ACTIVATIONS
from qkv.nn.norm import make_norm


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h[:, 0])) -> [B, D] (Devlin et al. 2019, §3: the [CLS] representation)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class MaskedLMHead(nn.Module):
    """decoder(norm(act(dense(h)))) + bias -> [B, T, V]; `decoder` is tied to the token embeddings.

    The transform maps d_model to `embedding_size` (equal for BERT and RoBERTa; smaller for
    ELECTRA's generator), so the tied decoder reads the embedding matrix as it is.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.embedding_size)
        self.act = ACTIVATIONS[cfg.mlp]
        self.norm = make_norm(cfg, cfg.embedding_size)
        self.decoder = Linear(cfg.embedding_size, cfg.vocab_size)

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class ClassificationHead(nn.Module):
    """Sequence classification on the first token -> [B, num_labels].

    classifier="pooler": out_proj(pooler_output) (BERT); "dense_tanh"/"dense_gelu":
    out_proj(act(dense(h[:, 0]))) (RoBERTa / ELECTRA); "first_token": out_proj(h[:, 0]) (ViT).
    Dropout as the model's, in training only.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.classifier
        self.dense = Linear(cfg.d_model, cfg.d_model) if cfg.classifier.startswith("dense") else None
        self.act = torch.tanh if cfg.classifier == "dense_tanh" else ACTIVATIONS["gelu"]
        self.drop = nn.Dropout(cfg.dropout)
        self.out_proj = Linear(cfg.d_model, cfg.num_labels)

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "pooler":
            return self.out_proj(self.drop(pooled))
        if self.kind == "first_token":
            return self.out_proj(hidden[:, 0])
        return self.out_proj(self.drop(self.act(self.dense(self.drop(hidden[:, 0])))))


class TokenClassificationHead(nn.Module):
    """A label per token: out_proj(dropout(h)) -> [B, T, num_labels]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.out_proj = Linear(cfg.d_model, cfg.num_labels)

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.out_proj(self.drop(hidden))


class ReplacedTokenHead(nn.Module):
    """ELECTRA's discriminator (Clark et al. 2020, §2): a logit per token, > 0 meaning "replaced" -> [B, T]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.d_model)
        self.act = ACTIVATIONS[cfg.mlp]
        self.out_proj = Linear(cfg.d_model, 1)

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.out_proj(self.act(self.dense(hidden))).squeeze(-1)


HEAD_CLASSES: dict[str, type[nn.Module]] = {
    "mlm": MaskedLMHead,
    "classification": ClassificationHead,
    "token_classification": TokenClassificationHead,
    "rtd": ReplacedTokenHead,
}


def check_labels(cfg: ModelConfig, labels: torch.Tensor, logits: torch.Tensor) -> None:
    """A clear error for labels that do not fit the head: wrong shape, or a class it does not have."""
    expected = logits.shape[:1] if cfg.head == "classification" else logits.shape[:2]
    if labels.shape != expected:
        raise UsageError(f"labels must have shape {tuple(expected)} for head={cfg.head!r}, got {tuple(labels.shape)}")
    if cfg.head in ("classification", "token_classification") and cfg.num_labels > 1:
        used = labels[labels != -100]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= cfg.num_labels):
            bad = int(used.max()) if int(used.max()) >= cfg.num_labels else int(used.min())
            raise UsageError(
                f"label {bad} does not fit the head's {cfg.num_labels} labels (num_labels); relabel to "
                f"0..{cfg.num_labels - 1} or build the head with more labels"
            )


def head_loss(
    head: str, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The training loss of a head, as HF computes it for the same head.

    mlm / token_classification: cross-entropy over positions whose label is not -100;
    classification: cross-entropy over [B] labels (mean squared error when num_labels == 1);
    rtd: binary cross-entropy over the tokens the attention mask keeps (labels 1 = replaced).
    """
    if head in ("mlm", "token_classification"):
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(), ignore_index=-100
        )
    if head == "classification":
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(labels, dtype=torch.bool)
    return F.binary_cross_entropy_with_logits(logits[keep].float(), labels[keep].float())


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str = "mean", normalize: bool = False
) -> torch.Tensor:
    """Sentence embeddings [B, D] from hidden states [B, T, D].

    mode "cls": the first token; "mean": the mean over the tokens the attention mask keeps
    (sentence-transformers' mean pooling, Reimers & Gurevych 2019); "max": their maximum.
    normalize: scale each row to unit L2 norm, so dot products are cosine similarities.
    """
    if mode == "cls":
        out = hidden[:, 0]
    elif mode in ("mean", "max"):
        mask = (attention_mask if attention_mask is not None else hidden.new_ones(hidden.shape[:2]))[..., None]
        mask = mask.to(hidden.dtype)
        if mode == "mean":
            out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        else:
            out = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; choose 'cls', 'mean' or 'max'")
    return F.normalize(out, p=2, dim=-1) if normalize else out
