"""`next_token_loss` (chunked float32 cross-entropy) against torch's `F.cross_entropy` on shifted logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import qkv.models.decoder as decoder
from qkv.models.decoder import next_token_loss


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook shifted loss: logits[:, t] predicts labels[:, t + 1], in float32."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_(True)
    loss = fn(leaf, labels)
    (loss * 3.0).backward()  # a non-unit upstream gradient
    return loss.detach(), leaf.grad


def example(dtype: torch.dtype, vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 9, vocab, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, vocab, (3, 9), generator=gen)
    labels[0, :4] = -100  # a masked prompt
    labels[2, 5] = -100
    return logits, labels


@pytest.mark.parametrize("chunk", [decoder.LOSS_CHUNK, 2 * 50, 50])  # one chunk; 2 rows; 1 row at a time
def test_loss_and_gradient_match_cross_entropy_in_float32(monkeypatch, chunk):
    monkeypatch.setattr(decoder, "LOSS_CHUNK", chunk)
    logits, labels = example(torch.float32)
    loss, grad = loss_and_grad(next_token_loss, logits, labels)
    ref_loss, ref_grad = loss_and_grad(reference_loss, logits, labels)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert grad[:, -1].abs().max() == 0  # the last position predicts nothing
    assert grad[0, :3].abs().max() == 0  # logits[0, t] predict masked labels[0, t + 1] for t < 3


def test_bf16_logits_get_a_float32_loss_and_a_bf16_gradient():
    logits, labels = example(torch.bfloat16, vocab=300)
    loss, grad = loss_and_grad(next_token_loss, logits, labels)
    ref_loss, ref_grad = loss_and_grad(reference_loss, logits, labels)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)  # both in float32 from the same bf16 values
    torch.testing.assert_close(grad, ref_grad, rtol=1e-2, atol=1e-5)  # bf16 rounding of the same numbers


def test_nothing_vocabulary_sized_in_float32_is_kept_for_backward():
    logits, labels = example(torch.bfloat16, vocab=1000)
    logits.requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        next_token_loss(logits, labels)
        reference_loss(logits, labels)
    ours, theirs = saved[: len(saved) // 2], saved[len(saved) // 2 :]
    big = 3 * 8 * 1000  # the reference keeps float32 log-probabilities of every predicting position
    assert any(t.dtype == torch.float32 and t.numel() >= big for t in theirs)
    assert not any(t.dtype == torch.float32 and t.numel() >= big for t in ours)


def test_every_label_ignored_gives_nan_like_torch():
    logits, labels = example(torch.float32)
    labels.fill_(-100)
    assert math.isnan(next_token_loss(logits, labels).item())
    assert math.isnan(reference_loss(logits, labels).item())
