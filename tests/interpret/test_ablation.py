"""Head ablation against an independent computation: the same head removed by zeroing its columns
of the output projection in a copy of the Hugging Face model."""

from __future__ import annotations

import copy

import pytest
import torch

import qkv
from oracle import shared_pair
from qkv.interpret import ablate_heads, heads_zeroed, parse_head
from tiny_models import random_ids

transformers = pytest.importorskip("transformers")


def _zero_head_in_hf(hf, layer: int, head: int):
    """A copy of the HF model whose `head` of `layer` writes nothing: its slice of o_proj's input
    multiplies zeros (GPT-2's Conv1D keeps the weight as [in, out], so rows there)."""
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        if hasattr(hf, "transformer"):
            attn = hf.transformer.h[layer].attn
            d = attn.head_dim
            attn.c_proj.weight[head * d : (head + 1) * d, :] = 0
        else:
            attn = hf.model.layers[layer].self_attn
            d = attn.head_dim
            attn.o_proj.weight[:, head * d : (head + 1) * d] = 0
    return hf


@pytest.mark.parametrize("name", ["gpt2-untied-ninner", "llama-gqa-6-2"])  # GQA: 6 query heads over 2 kv heads
def test_loss_and_logit_changes_match_zeroed_weights(name):
    hf, model = shared_pair(name)
    ids = random_ids(97, 2, 11, seed=2)
    heads = [(0, 1), (1, 5)]
    loss_change = ablate_heads(model, ids, heads)
    logit_change = ablate_heads(model, ids, heads, measure="logits")
    assert loss_change.shape == (2,) and logit_change.shape == (2, 2, 11, 97)
    with torch.no_grad():
        intact = hf(ids, labels=ids)
        for i, (layer, head) in enumerate(heads):
            ablated = _zero_head_in_hf(hf, layer, head)(ids, labels=ids)
            assert loss_change[i].item() == pytest.approx((ablated.loss - intact.loss).item(), abs=1e-5)
            assert torch.allclose(logit_change[i], ablated.logits - intact.logits, atol=1e-4)
    assert logit_change[0].abs().max().item() > 1e-3  # the head mattered: the check above could fail


def test_hooks_are_removed_and_several_heads_zero_together():
    _, model = shared_pair("llama-gqa-6-2")
    ids = random_ids(97, 1, 6, seed=3)
    before = model(ids).logits
    with heads_zeroed(model, [(0, 0), (0, 3), (1, 2)]):
        during = model(ids).logits
    assert not torch.allclose(before, during)
    assert torch.equal(model(ids).logits, before)


def test_encoder_decoder_cross_attention(tmp_path):
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    src, tgt = random_ids(64, 1, 7, seed=4), random_ids(64, 1, 5, seed=5)
    hf.save_pretrained(tmp_path / "t5")
    model = qkv.load(tmp_path / "t5").eval()
    change = ablate_heads(model, src, [(1, 2)], target_ids=tgt, kind="cross", measure="logits")
    zeroed = copy.deepcopy(hf)
    with torch.no_grad():
        zeroed.decoder.block[1].layer[1].EncDecAttention.o.weight[:, 16:24] = 0
        ref = zeroed(src, decoder_input_ids=tgt).logits - hf(src, decoder_input_ids=tgt).logits
    assert change.shape == (1, *ref.shape)
    assert torch.allclose(change[0], ref, atol=1e-4) and ref.abs().max().item() > 1e-4


def test_bad_heads():
    _, model = shared_pair("llama-gqa-6-2")
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match=r"layer 2 out of range; the model has layers 0\.\.1"):
        ablate_heads(model, ids, [(2, 0)])
    with pytest.raises(ValueError, match=r"head 6 out of range; layer 1 has heads 0\.\.5"):
        ablate_heads(model, ids, [(1, 6)])
    with pytest.raises(ValueError, match="encoder-decoder"):
        ablate_heads(model, ids, [(0, 0)], kind="cross")
    with pytest.raises(ValueError, match="measure"):
        ablate_heads(model, ids, [(0, 0)], measure="accuracy")
    assert parse_head("3.7") == (3, 7)
    for bad in ("3", "3.x", "-1.2", "1.2.3"):
        with pytest.raises(ValueError, match="LAYER.HEAD"):
            parse_head(bad)
