"""Gradient checkpointing (`set_grad_checkpointing`): the same gradients, less saved memory, and no
effect outside training.

Every family is covered: decoders (GPT-2, LLaMA), an encoder (BERT), encoder-decoders (T5, BART:
both stacks) and the vision transformer. With dropout the recomputed forward must draw the same
masks as the first one, so the gradients still match (checkpoint saves and restores the RNG).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qkv.models.stack as stack_module
from qkv import ModelConfig
from qkv.models import DecoderLM, Encoder, EncoderDecoder, VisionTransformer
from qkv.models.stack import TransformerStack, set_grad_checkpointing
from tiny_models import random_ids

VIT = dict(family="vit", vocab_size=None, d_model=32, n_layers=3, n_heads=4, d_ff=64, image_size=16,
           patch_size=4, n_channels=1, head="classification", classifier="first_token", num_labels=5)  # fmt: skip


def build(kind: str, dropout: float = 0.0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny random model of `kind` in training mode, and a batch with labels for it."""
    torch.manual_seed(0)
    drop = dict(dropout=dropout, attn_dropout=dropout)
    if kind in ("tiny-gpt2", "tiny-llama"):
        model = DecoderLM(ModelConfig.from_name(kind, **drop))
        ids = random_ids(model.config.vocab_size, 3, 12, seed=1)
        batch = {"input_ids": ids, "labels": ids}
    elif kind == "tiny-bert":
        model = Encoder(ModelConfig.from_name(kind, head="classification", num_labels=3, pooler=True, **drop))
        ids = random_ids(model.config.vocab_size, 3, 12, seed=1)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0  # a padded row
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}
    elif kind in ("tiny-t5", "tiny-bart"):
        model = EncoderDecoder(ModelConfig.from_name(kind, **drop))
        vocab = model.config.vocab_size
        batch = {"input_ids": random_ids(vocab, 3, 10, seed=1), "labels": random_ids(vocab, 3, 7, seed=2)}
    elif kind == "vit":
        model = VisionTransformer(ModelConfig(**VIT, **drop))
        pixels = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        batch = {"pixel_values": pixels, "labels": torch.tensor([0, 4, 2])}
    else:
        raise AssertionError(kind)
    return model.train(), batch


KINDS = ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5", "tiny-bart", "vit"]


def loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor], seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(kind: str, dropout: float) -> None:
    model, batch = build(kind, dropout)
    loss, grads = loss_and_grads(model, batch)
    set_grad_checkpointing(model, True)
    assert all(s.grad_checkpointing for s in model.modules() if isinstance(s, TransformerStack))
    loss_ckpt, grads_ckpt = loss_and_grads(model, batch)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_equal_with_and_without(kind):
    """fp32, no dropout: the recomputed forward gives the gradients of the stored one."""
    assert_same_training(kind, dropout=0.0)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-t5", "tiny-bert"])
def test_dropout_masks_are_redrawn_identically(kind):
    """With dropout 0.2 the same seed gives the same loss, and the gradients still match: the
    recomputation restores the RNG state, so it drops the same units as the first forward."""
    model, batch = build(kind, 0.2)
    loss_a, _ = loss_and_grads(model, batch, seed=0)
    loss_b, _ = loss_and_grads(model, batch, seed=1)
    assert not torch.equal(loss_a, loss_b)  # dropout is really on: another seed, another loss
    assert_same_training(kind, dropout=0.2)


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward outside checkpointed regions (inside one,
    checkpoint's own hooks take over and keep nothing)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return total


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-t5"])
def test_keeps_fewer_activations(kind):
    """The point of it: most activations are no longer held between forward and backward."""
    model, batch = build(kind)
    plain = saved_bytes(model, batch)
    set_grad_checkpointing(model, True)
    checkpointed = saved_bytes(model, batch)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_no_effect_outside_training(monkeypatch):
    """Eval mode, `no_grad` and cached generation never go through checkpoint (and give the same logits)."""
    model, batch = build("tiny-llama")
    model.eval()
    with torch.no_grad():
        expected = model(batch["input_ids"]).logits
        generated = model.generate(batch["input_ids"][:1], max_new_tokens=4, temperature=0.0)
    set_grad_checkpointing(model, True)

    def fail(*args, **kwargs):
        raise AssertionError("checkpoint ran outside training")

    monkeypatch.setattr(stack_module, "checkpoint", fail)
    torch.testing.assert_close(model(batch["input_ids"]).logits, expected, rtol=0, atol=0)  # eval, grad on
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"]).logits, expected, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.generate(batch["input_ids"][:1], max_new_tokens=4, temperature=0.0), generated)


def test_turns_off_again():
    model, batch = build("tiny-t5")
    set_grad_checkpointing(model, True)
    set_grad_checkpointing(model, False)
    assert not any(s.grad_checkpointing for s in model.modules() if isinstance(s, TransformerStack))
    plain = saved_bytes(model, batch)
    set_grad_checkpointing(model, True)
    assert saved_bytes(model, batch) < plain


def test_model_without_a_stack_is_an_error():
    with pytest.raises(ValueError, match="holds no TransformerStack"):
        set_grad_checkpointing(nn.Linear(2, 2), True)
