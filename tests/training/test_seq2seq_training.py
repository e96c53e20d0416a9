"""Encoder-decoder training through the `Trainer`: a tiny model learns to reverse sequences, and the
noise objectives' batches have the layout `EncoderDecoder` trains on."""

from __future__ import annotations

import pytest
import torch

from qkv.config import ModelConfig
from qkv.models import EncoderDecoder
from qkv.training import BlockLoader, Trainer, TrainingConfig
from qkv.training.seq2seq import DenoisingCollate, PairCollate, SpanCorruptionCollate, pack_pairs

PAD, EOS, START = 0, 1, 2
DIGITS = range(3, 15)


def reversal_pairs(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        seq = torch.randint(DIGITS.start, DIGITS.stop, (length,), generator=g).tolist()
        pairs.append(([*seq, EOS], [*seq[::-1], EOS]))
    return pairs


def test_a_tiny_model_learns_to_reverse_sequences():
    torch.manual_seed(0)
    cfg = ModelConfig(
        family="seq2seq", vocab_size=16, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=16,
        norm_position="pre", position="learned", mlp="gelu", pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=START, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
    )  # fmt: skip
    model = EncoderDecoder(cfg)
    train = pack_pairs(reversal_pairs(4000, seed=1), PAD, 9, 9)
    held_out = [p for p in reversal_pairs(300, seed=2) if p not in reversal_pairs(4000, seed=1)][:200]
    trainer = Trainer(
        model, TrainingConfig(steps=700, lr=3e-3, warmup_steps=50, weight_decay=0.0, progress=False),
        BlockLoader(train, batch_size=64, seed=0), collate=PairCollate(9, PAD),
    )  # fmt: skip
    records = trainer.train()
    assert records[-1]["loss"] < records[0]["loss"] / 5
    model.eval()
    sources = pack_pairs(held_out, PAD, 9, 9)[:, :9]
    mask = (sources != PAD).long()
    out = model.generate(sources, max_new_tokens=10, attention_mask=mask, eos_token_id=EOS, pad_token_id=PAD)
    exact = sum(out[i, 1 : 1 + len(tgt)].tolist() == tgt for i, (_, tgt) in enumerate(held_out)) / len(held_out)
    assert exact >= 0.95, exact


def test_span_corruption_batch_layout():
    blocks = torch.arange(10, 70).reshape(3, 20)
    batch = SpanCorruptionCollate(sentinel_ids=list(range(99, 89, -1)), eos_id=EOS, pad_id=PAD, seed=0)(blocks)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for row in range(3):
        inputs = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        labels = [t for t in batch["labels"][row].tolist() if t != -100]
        assert inputs[-1] == EOS and labels[-1] == EOS and inputs[0] == blocks[row, 0]  # starts with kept text
        assert sorted(t for t in inputs + labels if t < 90 and t != EOS) == blocks[row].tolist()


def test_noise_collates_resume_exactly():
    blocks = torch.arange(10, 110).reshape(4, 25)
    for make in (lambda: SpanCorruptionCollate(list(range(120, 100, -1)), EOS, PAD, seed=3),
                 lambda: DenoisingCollate(mask_id=4, eos_id=EOS, pad_id=PAD, seed=3)):  # fmt: skip
        a = make()
        a(blocks)
        state = a.state_dict()
        expected = a(blocks)
        b = make()
        b.load_state_dict(state)
        resumed = b(blocks)
        assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_denoising_batch_targets_are_the_text():
    blocks = torch.arange(10, 50).reshape(2, 20)
    batch = DenoisingCollate(mask_id=4, eos_id=EOS, pad_id=PAD, seed=0)(blocks)
    for row in range(2):
        assert [t for t in batch["labels"][row].tolist() if t != -100] == [*blocks[row].tolist(), EOS]
        assert 4 in batch["input_ids"][row].tolist()


@pytest.mark.parametrize("objective", ["span", "denoise"])
def test_noise_objective_losses_fall_on_a_small_corpus(objective):
    text = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. " * 40
    ids = torch.tensor([5 + (ord(c) % 40) for c in text])
    blocks = ids[: len(ids) // 24 * 24].reshape(-1, 24)
    torch.manual_seed(0)
    cfg = ModelConfig(family="seq2seq", vocab_size=64, d_model=48, n_layers=2, n_heads=4, d_ff=96, max_seq_len=48,
                      norm_position="pre", position="learned", pad_token_id=PAD, eos_token_id=EOS,
                      decoder_start_token_id=START)  # fmt: skip
    collate = (
        SpanCorruptionCollate(list(range(63, 45, -1)), EOS, PAD, seed=0)
        if objective == "span"
        else DenoisingCollate(mask_id=4, eos_id=EOS, pad_id=PAD, seed=0, sentence_end_ids=[5 + ord(".") % 40])
    )
    trainer = Trainer(EncoderDecoder(cfg), TrainingConfig(steps=80, lr=3e-3, warmup_steps=10, progress=False),
                      BlockLoader(blocks, batch_size=16, seed=0), collate=collate)  # fmt: skip
    losses = [r["loss"] for r in trainer.train()]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
