"""Position information: sinusoidal tables, rotary embeddings (with scaling) and ALiBi slopes.

Learned absolute positions are a plain `nn.Embedding` in `qkv.nn.embedding.Embeddings`, which also
adds the sinusoidal table; RoPE rotates queries and keys inside attention; ALiBi's slopes become an
additive bias in `qkv.nn.mask.alibi_bias`; T5's relative buckets are a learned bias per head
(`RelativePositionBias`), also added to the mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qkv.config import ModelConfig


def sinusoidal_positions(
    positions: torch.Tensor, dim: int, base: float = 10000.0, layout: str = "interleaved"
) -> torch.Tensor:
    """Vaswani et al. 2017 §3.5 for the given positions [...] -> [..., dim] float32, with angles
    pos / base^(2i/dim) computed in float64.

    layout "interleaved": PE(pos, 2i) = sin, PE(pos, 2i+1) = cos (the paper, fairseq);
    "halves": the sines in the first ceil(dim/2) columns, the cosines after them (Marian,
    HF's `MarianSinusoidalPositionalEmbedding`). Both appear in real checkpoints. Computed for the
    positions asked, never as a table of the model's whole length.
    """
    if layout not in ("interleaved", "halves"):
        raise ValueError(f"unknown sinusoid layout {layout!r}; choose 'interleaved' or 'halves'")
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[..., None] * inv
    sin, cos = torch.sin(angles), torch.cos(angles)[..., : dim // 2]
    if layout == "halves":
        return torch.cat((sin, cos), dim=-1).float()
    out = torch.zeros(*positions.shape, dim, dtype=torch.float64, device=positions.device)
    out[..., 0::2], out[..., 1::2] = sin, cos
    return out.float()


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0, layout: str = "interleaved") -> torch.Tensor:
    """[n_positions, dim]: `sinusoidal_positions` of 0 .. n_positions - 1."""
    return sinusoidal_positions(torch.arange(n_positions), dim, base, layout)


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (key - query) (Raffel et al. 2020, §2.1).

    Half the buckets (all of them when causal, where keys after the query cannot occur) hold exact
    small distances; the rest cover distances up to max_distance on a log scale, and farther ones
    share the last bucket. Bidirectional attention gives keys after the query their own half.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    far = (
        max_exact
        + (
            torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        ).long()
    )
    far = far.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias, computed once per forward and shared by every layer of
    a stack: slots -> additive bias [1, H, T, S]."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.embed = nn.Embedding(cfg.relative_buckets, cfg.n_heads)

    def forward(self, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
        relative = k_slots[None, :] - q_slots[:, None]  # (T, S)
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embed(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022 §3): a geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, the slopes of the closest lower power of two are
    followed by every other slope of the next power of two, as in the paper's reference code.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of RoPE (Su et al. 2021) and the cos/sin scale, with `cfg.rope_scaling`.

    Scalings: linear position interpolation (Chen et al. 2023), dynamic NTK (bloc97/emozilla;
    depends on the current `seq_len`), Llama 3.1 frequency-band smoothing, and YaRN (Peng et al.
    2023, incl. its attention temperature). Formulas follow the HF reference implementations.
    """
    dim = cfg.rotary_dim
    base = cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type")
    factor = scaling.get("factor")
    if kind is None:
        return 1.0 / base**exponents, 1.0
    if kind == "linear":
        return 1.0 / base**exponents / factor, 1.0
    if kind == "dynamic":
        seq_len = max(seq_len or 0, cfg.max_seq_len)
        base = base * ((factor * seq_len / cfg.max_seq_len) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base**exponents, 1.0
    if kind == "llama3":
        inv_freq = 1.0 / base**exponents
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    original = scaling["original_max_position_embeddings"]
    if factor is None:
        factor = cfg.max_seq_len / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. Rotation uses the half-split (GPT-NeoX/HF LLaMA) layout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dynamic = (cfg.rope_scaling or {}).get("type") == "dynamic"
        self.register_buffer("inv_freq", torch.empty(cfg.rotary_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the frequencies, e.g. after the model was built on the meta device."""
        if device is None:
            device = self.inv_freq.device
        # On the CPU, then moved: on the meta device (a model built to be loaded) the arithmetic
        # would run through torch's Python decompositions, whose first use imports torch._dynamo.
        with torch.device("cpu"):
            inv_freq, self.scale = rope_inv_freq(self.cfg)
        self.inv_freq = inv_freq.to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [B, T] -> (cos, sin), each [B, 1, T, rotary_dim]."""
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.cfg.max_seq_len:
                inv_freq = rope_inv_freq(self.cfg, seq_len)[0].to(inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rot)
        cos, sin = emb.cos() * self.scale, emb.sin() * self.scale
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rot = cos.shape[-1]` features of each head; the rest pass through.

    x: [..., hd] with cos/sin broadcastable to x[..., :rot]. Attention calls it token-major:
    x [B, T, H, hd] (query and key heads together) with cos/sin [B, T, 1, rot].
    """
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
