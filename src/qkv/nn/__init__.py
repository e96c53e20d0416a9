"""The parts every transformer is made of, each written once and configured by `ModelConfig`."""

from qkv.nn.attention import Attention, scaled_dot_product_attention
from qkv.nn.block import Block
from qkv.nn.mask import build_attention_mask
from qkv.nn.mlp import MLP
from qkv.nn.norm import RMSNorm, make_norm
from qkv.nn.position import RotaryEmbedding, alibi_slopes, apply_rotary, sinusoidal_table

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "RMSNorm",
    "RotaryEmbedding",
    "alibi_slopes",
    "apply_rotary",
    "build_attention_mask",
    "make_norm",
    "scaled_dot_product_attention",
    "sinusoidal_table",
]
