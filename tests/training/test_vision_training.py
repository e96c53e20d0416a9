"""ViT and CLIP train through the `Trainer` on real images (scikit-learn's handwritten digits)."""

from __future__ import annotations

import pytest
import torch

from qkv.config import ModelConfig
from qkv.models import CLIP, CLIPConfig, VisionTransformer
from qkv.tokenizer import train_tokenizer
from qkv.training import BlockLoader, Trainer, TrainingConfig
from qkv.training.vision import (
    CAPTION_TEMPLATES,
    CaptionCollate,
    ImageCollate,
    caption,
    classification_accuracy,
    clip_retrieval_recall,
    clip_zero_shot_accuracy,
    confusion_matrix,
    load_digits_images,
    pack_images,
    split,
)

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    """A 200-image training subset and a 200-image held-out set (stratified)."""
    data = load_digits_images(16)
    train, test = split(data, test_fraction=0.2, seed=0)
    g = torch.Generator().manual_seed(0)
    return train.subset(torch.randperm(len(train), generator=g)[:200]), test.subset(torch.arange(200))


def _vit(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ModelConfig(
        family="vit", vocab_size=None, d_model=48, n_layers=2, n_heads=4, d_ff=96, image_size=16, patch_size=4,
        n_channels=1, head="classification", classifier="first_token", num_labels=10, **overrides,
    ))  # fmt: skip


def test_split_is_stratified_and_disjoint():
    data = load_digits_images(8)
    train, test = split(data, 0.2, seed=0)
    assert len(train) + len(test) == 1797 and data.images.shape[1:] == (1, 8, 8)
    assert {tuple(x.flatten().tolist()) for x in train.images[:50]}.isdisjoint(
        {tuple(x.flatten().tolist()) for x in test.images}
    )
    shares = torch.bincount(test.labels, minlength=10) / torch.bincount(data.labels, minlength=10)
    assert ((shares - 0.2).abs() < 0.02).all()


def test_vit_loss_falls_and_accuracy_beats_chance_widely(digits):
    train, test = digits
    model = _vit()
    trainer = Trainer(model, TrainingConfig(steps=150, lr=2e-3, warmup_steps=20, progress=False),
                      BlockLoader(pack_images(train), 32, seed=0), collate=ImageCollate((1, 16, 16)))  # fmt: skip
    losses = [r["loss"] for r in trainer.train()]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    accuracy = classification_accuracy(model, test)
    assert accuracy > 0.5  # chance: 0.1
    matrix = confusion_matrix(model, test)
    assert matrix.sum() == 200 and matrix.trace() / 200 == pytest.approx(accuracy)


def test_clip_loss_falls_and_zero_shot_beats_chance(digits):
    train, test = digits
    captions = [caption(y, t) for y in range(10) for t in CAPTION_TEMPLATES]
    tok = train_tokenizer(kind="bpe", texts=captions * 5, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    text = ModelConfig(
        family="encoder",
        vocab_size=tok.vocab_size,
        d_model=48,
        n_layers=2,
        n_heads=4,
        d_ff=96,
        max_seq_len=24,
        mlp="quick_gelu",
        eos_token_id=tok.eos_token_id,
        tie_embeddings=False,
    )
    vision = ModelConfig(family="vit", vocab_size=None, d_model=48, n_layers=2, n_heads=4, d_ff=96, image_size=16,
                         patch_size=4, n_channels=1, mlp="quick_gelu", embed_norm=True, norm_pooled_only=True,
                         patch_bias=False)  # fmt: skip
    model = CLIP(CLIPConfig(text=text, vision=vision, projection_dim=32))
    trainer = Trainer(
        model,
        TrainingConfig(steps=300, lr=2e-3, warmup_steps=20, progress=False),
        BlockLoader(pack_images(train), 50, seed=0),
        collate=CaptionCollate(tok, (1, 16, 16)),
    )
    losses = [r["loss"] for r in trainer.train()]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert clip_zero_shot_accuracy(model, tok, test) > 0.3  # chance: 0.1, from captions alone
    recall = clip_retrieval_recall(model, tok, test)
    assert recall["recall@5"] >= recall["recall@1"] > 0.3
