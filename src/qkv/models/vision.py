"""Vision: `VisionTransformer` (ViT) and `CLIP` — the same stack over another input.

ViT (Dosovitskiy et al. 2020) is a bidirectional `TransformerStack` whose embedding is
`PatchEmbedding` (patches, [CLS], positions), with an optional pooler and a classification head
on the first token. CLIP (Radford et al. 2021) is two towers — a causal text stack pooled at the
end-of-text token and a ViT pooled at [CLS] — each followed by a linear projection into one space,
compared by cosine similarity scaled by a learned temperature (`logit_scale`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models.heads import ClassificationHead, Pooler, check_labels, head_loss
from qkv.models.output import ModelOutput
from qkv.models.stack import TransformerStack
from qkv.nn.linear import Linear


class VisionTransformer(TransformerStack):
    """`forward(pixel_values [B, C, H, W]) -> ModelOutput(last_hidden_state [B, 1 + N, D],
    pooler_output, logits [B, num_labels] with a classification head)`."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.family != "vit":
            raise ValueError(f"VisionTransformer needs a config with family='vit', got {cfg.family!r}")
        super().__init__(cfg, causal=False)
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.head = ClassificationHead(cfg) if cfg.head == "classification" else None
        if not self.embed.cls.is_meta:  # built on meta to be loaded: skip the random init
            self.apply(self.init_weights)
            nn.init.normal_(self.embed.cls, std=0.02)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        attention_rows: int | Sequence[int] | torch.Tensor | None = None,
        attention_layers: int | Sequence[int] | None = None,
    ) -> ModelOutput:
        """pixel_values: [B, C, H, W] normalised as the model was trained (`qkv.vision`); another
        image size needs interpolate_pos_encoding=True. labels: [B] classes. attention_rows (over
        [CLS] + patches) / attention_layers: as in `TransformerStack.run`."""
        x = self.embed(pixel_values, interpolate_pos_encoding)
        out = self.run(
            None, inputs_embeds=x, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            attention_rows=attention_rows, attention_layers=attention_layers,
        )  # fmt: skip
        h = out.last_hidden_state
        if self.config.norm_pooled_only:  # CLIP: the final norm reads the [CLS] token alone
            pooled = self.norm(h[:, 0])
        else:
            pooled = self.pooler(h) if self.pooler is not None else None
        logits = self.head(h, pooled) if self.head is not None else None
        loss = None
        if labels is not None:
            if logits is None:
                raise UsageError("labels need a classification head; this ViT has head='none'")
            check_labels(self.config, labels, logits)
            loss = head_loss("classification", logits, labels, None)
        return ModelOutput(
            last_hidden_state=h, logits=logits, loss=loss, hidden_states=out.hidden_states, attentions=out.attentions,
            pooler_output=pooled,
        )  # fmt: skip


@dataclass(frozen=True)
class CLIPConfig:
    """CLIP's two towers (each a `ModelConfig`) and the shared embedding space."""

    text: ModelConfig
    vision: ModelConfig
    projection_dim: int = 512
    logit_scale_init: float = 2.6592  # log(1 / 0.07), the paper's initial temperature

    family = "clip"

    def __post_init__(self) -> None:
        if not isinstance(self.text, ModelConfig) or self.text.family != "encoder":
            raise ValueError("CLIPConfig.text must be a ModelConfig with family='encoder' (run causally by CLIP)")
        if not isinstance(self.vision, ModelConfig) or self.vision.family != "vit":
            raise ValueError("CLIPConfig.vision must be a ModelConfig with family='vit'")
        if not isinstance(self.projection_dim, int) or self.projection_dim < 1:
            raise ValueError(f"CLIPConfig.projection_dim={self.projection_dim!r} must be a positive integer")

    @property
    def context_limit(self) -> int | None:
        return self.text.context_limit

    def to_dict(self) -> dict[str, Any]:
        return {"family": "clip", "text": self.text.to_dict(), "vision": self.vision.to_dict(),
                "projection_dim": self.projection_dim, "logit_scale_init": self.logit_scale_init}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        data = {k: v for k, v in data.items() if k != "family"}
        text, vision = ModelConfig.from_dict(data.pop("text")), ModelConfig.from_dict(data.pop("vision"))
        return cls(text=text, vision=vision, **data)

    def replace(self, **changes: Any) -> CLIPConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class CLIPOutput:
    """What `CLIP.forward` returns (HF's `CLIPOutput` fields)."""

    logits_per_image: torch.Tensor  # [N_images, N_texts]
    logits_per_text: torch.Tensor  # [N_texts, N_images]
    text_embeds: torch.Tensor  # [N_texts, P], unit norm
    image_embeds: torch.Tensor  # [N_images, P], unit norm
    loss: torch.Tensor | None = None
    text_output: ModelOutput | None = None
    vision_output: ModelOutput | None = None


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE loss (Radford et al. 2021, Figure 3; van den Oord et al. 2018): the
    mean of cross-entropy over texts -> images and images -> texts, matching pairs on the diagonal."""
    targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2


class CLIP(nn.Module):
    """Two towers and two projections: `encode_text`, `encode_image`, and `forward` for both."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tokenizer: Any = None  # set by loaders when the source carries one
        self.text = TransformerStack(cfg.text, causal=True)
        self.vision = VisionTransformer(cfg.vision)
        self.text_projection = Linear(cfg.text.d_model, cfg.projection_dim, bias=False)
        self.visual_projection = Linear(cfg.vision.d_model, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        if not self.logit_scale.is_meta:
            self.text.apply(TransformerStack.init_weights)
            for proj in (self.text_projection, self.visual_projection):
                nn.init.normal_(proj.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.dtype

    def _eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        eos = self.config.text.eos_token_id
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None or eos == 2:
            # The original CLIP rule (and HF's for configs with the legacy eos id 2): the highest id
            # is the end-of-text token in CLIP's vocabulary.
            return input_ids.argmax(dim=-1)
        return (input_ids == eos).int().argmax(dim=-1)  # the first end-of-text token

    def text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **outputs: bool
    ) -> tuple[torch.Tensor, ModelOutput]:
        """(pooled text features [B, D_text] at the end-of-text token, the tower's output)."""
        out = self.text.run(input_ids, attention_mask, **outputs)
        h = out.last_hidden_state
        pooled = h[torch.arange(h.shape[0], device=h.device), self._eos_positions(input_ids)]
        return pooled, ModelOutput(
            last_hidden_state=h, hidden_states=out.hidden_states, attentions=out.attentions, pooler_output=pooled
        )

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Text embeddings [B, P] in the shared space (unit norm unless normalize=False)."""
        embeds = self.text_projection(self.text_features(input_ids, attention_mask)[0])
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_image(
        self, pixel_values: torch.Tensor, normalize: bool = True, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        """Image embeddings [B, P] in the shared space (unit norm unless normalize=False)."""
        pooled = self.vision(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).pooler_output
        embeds = self.visual_projection(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        attention_rows: int | Sequence[int] | torch.Tensor | None = None,
        attention_layers: int | Sequence[int] | None = None,
    ) -> CLIPOutput:
        """Similarity logits of every image with every text; return_loss adds `clip_loss` (the i-th
        text belongs with the i-th image); None: in training mode only (so the Trainer gets a loss).
        attention_rows / attention_layers apply to each tower against its own tokens and layers."""
        outputs = dict(
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            attention_rows=attention_rows, attention_layers=attention_layers,
        )  # fmt: skip
        pooled_text, text_out = self.text_features(input_ids, attention_mask, **outputs)
        vision_out = self.vision(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **outputs)
        text_embeds = F.normalize(self.text_projection(pooled_text), dim=-1)
        image_embeds = F.normalize(self.visual_projection(vision_out.pooler_output), dim=-1)
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()
        return CLIPOutput(
            logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text, text_embeds=text_embeds,
            image_embeds=image_embeds,
            loss=clip_loss(logits_per_text) if (self.training if return_loss is None else return_loss) else None,
            text_output=text_out, vision_output=vision_out,
        )  # fmt: skip
