"""One layer (`qkv.nn.block`): the pre-norm and post-norm residual formulas written out, with and
without cross-attention, and residual dropout only in train mode."""

from __future__ import annotations

import pytest
import torch

from qkv.config import ModelConfig
from qkv.nn.attention import AttentionInputs
from qkv.nn.block import Block
from qkv.nn.mask import AttentionMask, build_attention_mask

B, T, S, D = 2, 6, 9, 32


pytestmark = pytest.mark.usefixtures("seeded")


def make_block(norm_position: str, cross: bool = False, **overrides) -> Block:
    cfg = ModelConfig(
        d_model=D, n_heads=4, n_kv_heads=2, d_ff=48, norm_position=norm_position, qkv_bias=True, **overrides
    )
    block = Block(cfg, cross_attention=cross).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm would show
        for norm in (block.attn_norm, block.mlp_norm, block.cross_norm):
            if norm is not None:
                norm.weight.normal_(1.0, 0.3)
    return block


def inputs() -> AttentionInputs:
    return AttentionInputs(masks={"full": build_attention_mask(torch.arange(T), torch.arange(T), causal=True)})


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_pre_norm_residuals(norm):
    """GPT-2/LLaMA: h = x + attn(ln1(x)); out = h + mlp(ln2(h))."""
    block = make_block("pre", norm=norm)
    x, inp = torch.randn(B, T, D), inputs()
    h = x + block.attn(block.attn_norm(x), inp)[0]
    expected = h + block.mlp(block.mlp_norm(h))
    out, self_weights, cross_weights = block(x, inp)
    torch.testing.assert_close(out, expected)
    assert self_weights is None and cross_weights is None


def test_post_norm_residuals():
    """Vaswani et al. 2017 §5.4 / BERT: h = ln1(x + attn(x)); out = ln2(h + mlp(h))."""
    block = make_block("post")
    x, inp = torch.randn(B, T, D), inputs()
    h = block.attn_norm(x + block.attn(x, inp)[0])
    expected = block.mlp_norm(h + block.mlp(h))
    torch.testing.assert_close(block(x, inp)[0], expected)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_cross_attention_sits_between_self_attention_and_mlp(norm_position):
    block = make_block(norm_position, cross=True)
    x, context, inp = torch.randn(B, T, D), torch.randn(B, S, D), inputs()
    ctx_inputs = AttentionInputs(masks={"cross": AttentionMask(None)})

    def cross(h):
        return block.cross_attn(h, ctx_inputs, context)[0]

    if norm_position == "pre":
        h = x + block.attn(block.attn_norm(x), inp)[0]
        h = h + cross(block.cross_norm(h))
        expected = h + block.mlp(block.mlp_norm(h))
    else:
        h = block.attn_norm(x + block.attn(x, inp)[0])
        h = block.cross_norm(h + cross(h))
        expected = block.mlp_norm(h + block.mlp(h))
    torch.testing.assert_close(block(x, inp, context, ctx_inputs)[0], expected)


def test_attention_weights_come_back_when_asked():
    block = make_block("pre", cross=True)
    x, context = torch.randn(B, T, D), torch.randn(B, S, D)
    inp = inputs()
    inp.need_weights = True
    _, self_weights, cross_weights = block(
        x, inp, context, AttentionInputs(masks={"cross": AttentionMask(None)}, need_weights=True)
    )
    assert self_weights.shape == (B, 4, T, T) and cross_weights.shape == (B, 4, T, S)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_dropout_only_in_train_mode(norm_position):
    block = make_block(norm_position, dropout=0.5, attn_dropout=0.5)
    x, inp = torch.randn(B, T, D), inputs()
    eval_out = block(x, inp)[0]
    torch.testing.assert_close(block(x, inp)[0], eval_out, atol=0, rtol=0)
    block.train()
    a, b = block(x, inp)[0], block(x, inp)[0]
    assert not torch.allclose(a, b) and not torch.allclose(a, eval_out)
    block.eval()
    torch.testing.assert_close(block(x, inp)[0], eval_out, atol=0, rtol=0)
