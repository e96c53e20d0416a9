"""Input embeddings: tokens, absolute positions (learned or sinusoidal), token types, optional norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkv.config import ModelConfig
from qkv.nn.linear import Linear
from qkv.nn.norm import make_norm
from qkv.nn.position import sinusoidal_positions


class Embeddings(nn.Module):
    """token + position (+ token type) embeddings, then optional LayerNorm (BERT), dropout, and a
    projection up to d_model when `embedding_size` is smaller (ELECTRA's `embeddings_project`).

    RoPE, ALiBi and T5 positions act inside attention, so for them only tokens are embedded here.
    Learned position ids are shifted by `position_offset` (RoBERTa keeps the rows below it for
    padding). `scale_embeddings` multiplies token embeddings by sqrt(d_model) (Vaswani et al. 2017 §3.4).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embedding_size
        self.offset = cfg.position_offset
        self.tokens = nn.Embedding(cfg.vocab_size, dim)
        self.positions = nn.Embedding(cfg.max_seq_len + self.offset, dim) if cfg.position == "learned" else None
        self.sinusoid = cfg.position == "sinusoidal"  # computed per forward for the positions used
        self.token_types = nn.Embedding(cfg.type_vocab_size, dim) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg, dim) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.project = Linear(dim, cfg.d_model) if dim != cfg.d_model else None
        self.scale = cfg.d_model**0.5 if cfg.scale_embeddings else 1.0

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids, token_type_ids: [B, T] -> [B, T, d_model]."""
        x = self.tokens(input_ids)
        if self.scale != 1.0:
            x = x * self.scale
        if self.positions is not None:
            x = x + self.positions(position_ids + self.offset if self.offset else position_ids)
        elif self.sinusoid:
            positions = sinusoidal_positions(position_ids, self.cfg.embedding_size, layout=self.cfg.sinusoid_layout)
            x = x + positions.to(x.dtype)
        if self.token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_types(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        x = self.drop(x)
        return self.project(x) if self.project is not None else x


class PatchEmbedding(nn.Module):
    """ViT's input (Dosovitskiy et al. 2020, §3.1): non-overlapping P x P patches, flattened and
    projected (the same as a convolution with stride P), a learned [CLS] vector in front, learned
    positions, then an optional LayerNorm (CLIP's `pre_layrnorm`) and dropout.

    pixel_values [B, C, H, W] -> [B, 1 + (H/P)(W/P), D]. Another image size needs
    `interpolate=True`: the position grid is resized bicubically, as HF's `interpolate_pos_encoding`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch, self.grid = cfg.patch_size, cfg.image_size // cfg.patch_size
        self.project = Linear(cfg.n_channels * cfg.patch_size**2, cfg.d_model, bias=cfg.patch_bias)
        self.cls = nn.Parameter(torch.zeros(1, cfg.d_model))
        self.positions = nn.Embedding(1 + self.grid**2, cfg.d_model)
        self.norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def check(self, pixel_values: torch.Tensor, interpolate: bool) -> None:
        """A clear error for input the model cannot embed: rank, channels, size."""
        cfg = self.cfg
        if pixel_values.dim() != 4 or not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a float tensor [batch, channels, height, width], got "
                f"{pixel_values.dtype} {tuple(pixel_values.shape)}"
            )
        _, channels, height, width = pixel_values.shape
        if channels != cfg.n_channels:
            raise ValueError(
                f"the model takes {cfg.n_channels}-channel images, got {channels} channels; "
                + ("convert grayscale images to RGB first" if channels == 1 else "convert the images")
            )
        if height % self.patch or width % self.patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch}")
        size_matches = height == cfg.image_size and width == cfg.image_size
        if not interpolate and not size_matches:
            raise ValueError(
                f"image size {height}x{width} differs from the model's {cfg.image_size}x{cfg.image_size}; resize it "
                "(qkv.vision preprocessing does) or pass interpolate_pos_encoding=True"
            )

    def position_table(self, height: int, width: int) -> torch.Tensor:
        """Positions for an image of height x width: the table itself, or its grid resized."""
        table = self.positions.weight
        gh, gw = height // self.patch, width // self.patch
        if (gh, gw) == (self.grid, self.grid):
            return table
        grid = table[1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat((table[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)))

    def forward(self, pixel_values: torch.Tensor, interpolate: bool = False) -> torch.Tensor:
        self.check(pixel_values, interpolate)
        B, C, H, W = pixel_values.shape
        P = self.patch
        patches = pixel_values.unfold(2, P, P).unfold(3, P, P)  # (B, C, H/P, W/P, P, P)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // P) * (W // P), C * P * P)
        x = self.project(patches.to(self.project.weight.dtype))
        x = torch.cat((self.cls.to(x.dtype).expand(B, 1, -1), x), dim=1)  # [CLS] first
        x = x + self.position_table(H, W).to(x.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)
