"""Shared builders of small reference tokenizers (Hugging Face `tokenizers` engines) for tests."""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Engine

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>"]


def sentencepiece_engine(
    texts: Iterable[str],
    *,
    vocab_size: int,
    limit_alphabet: int,
    decoder: str = "replace",
    extra_specials: Iterable[str] = (),
    added: Iterable[str] = (),
) -> Engine:
    """A SentencePiece-style BPE as LLaMA's, trained on `texts`: ▁ for spaces with a dummy prefix,
    <0xNN> byte fallback for characters outside the (deliberately small) alphabet, <unk> <s> </s>
    plus `extra_specials`, and `added` as plain added tokens. decoder: "replace" (llama.cpp's, as
    qkv's GGUF loader builds it) or "metaspace" (older HF tokenizer.json files)."""
    trainer_engine = Engine(models.BPE())
    trainer_engine.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_engine.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SENTENCEPIECE_SPECIALS + BYTE_TOKENS, limit_alphabet=limit_alphabet,
        show_progress=False,
    )  # fmt: skip
    trainer_engine.train_from_iterator(texts, trainer)
    model = json.loads(trainer_engine.to_str())["model"]
    engine = Engine(models.BPE(model["vocab"], [tuple(m) for m in model["merges"]], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))  # fmt: skip
    engine.normalizer = trainer_engine.normalizer
    engine.pre_tokenizer = trainer_engine.pre_tokenizer
    if decoder == "replace":
        engine.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    elif decoder == "metaspace":
        engine.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    else:
        raise ValueError(f"decoder {decoder!r}: choose 'replace' or 'metaspace'")
    specials = [*SENTENCEPIECE_SPECIALS, *extra_specials]
    engine.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if added:
        engine.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return engine
