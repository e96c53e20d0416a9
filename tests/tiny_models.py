"""Tiny random qkv models, and random token ids to feed them.

The Hugging Face oracle models (the same weights in transformers and in qkv) are in oracle.py.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from qkv import DecoderLM, ModelConfig
from qkv.models.encoder import Encoder


def tiny_model(preset: str, seed: int = 0, **overrides) -> DecoderLM:
    """`DecoderLM(ModelConfig.from_name(preset, **overrides))` in eval mode, initialised after
    `torch.manual_seed(seed)` (so the global RNG is left in a known state too)."""
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig.from_name(preset, **overrides)).eval()


def tiny_encoder_with_tokenizer() -> Encoder:
    """A random 2-layer BERT (eval mode) whose `tokenizer` is a WordPiece of 300 trained on a little
    stdlib source: a sentence encoder small enough for any test (embeddings, the server)."""
    from qkv.tokenizer import train_tokenizer

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:3]
    tok = train_tokenizer(
        kind="wordpiece", texts=[f.read_text(encoding="utf-8") for f in files], vocab_size=300, show_progress=False
    )
    torch.manual_seed(0)
    model = Encoder(ModelConfig.from_name("tiny-bert", vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id))
    model.tokenizer = tok
    return model.eval()


def random_ids(vocab: int, batch: int, length: int, *, seed: int, low: int = 3) -> torch.Tensor:
    """[batch, length] token ids drawn uniformly from [low, vocab) by a generator of their own.

    The global RNG is not touched. `low=3` keeps clear of the special ids (0-2) of the oracle
    configs; pass `low=0` for the whole vocabulary.
    """
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths [T_i] as one left-padded batch -> (input_ids [B, T], attention_mask [B, T])."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def peft_adapter(hf_model, targets: list[str], rank: int, alpha: float, seed: int):
    """`peft.get_peft_model(hf_model, LoraConfig(...))` with every LoRA weight drawn at random
    (x 0.2), so that the adapter changes the logits (PEFT's own init leaves B at zero)."""
    import peft

    model = peft.get_peft_model(hf_model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# A Trainer test's model and data: GPT-2 style, 32 wide, so a training step takes milliseconds.
TRAIN_VOCAB, TRAIN_SEQ = 64, 16


def tiny_trainable_gpt2(n_layers: int = 1, **overrides) -> DecoderLM:
    """A `tiny_model("tiny-gpt2")` over TRAIN_VOCAB tokens and TRAIN_SEQ positions."""
    settings = dict(vocab_size=TRAIN_VOCAB, d_model=32, n_heads=2, n_layers=n_layers, max_seq_len=TRAIN_SEQ)
    return tiny_model("tiny-gpt2", **(settings | overrides))


def random_blocks(n: int = 20, seed: int = 0) -> torch.Tensor:
    """n blocks of TRAIN_SEQ random token ids below TRAIN_VOCAB, int32, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TRAIN_VOCAB, (n, TRAIN_SEQ), generator=g, dtype=torch.int32)
