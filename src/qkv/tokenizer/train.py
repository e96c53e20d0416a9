"""Training tokenizers with Hugging Face `tokenizers`: GPT-2 style byte-level BPE and BERT WordPiece.

>>> tok = train_tokenizer(kind="wordpiece", texts=["Hello there, hello world"] * 20,
...                       vocab_size=60, show_progress=False)
>>> tok.encode("hello")[0] == tok.token_to_id("[CLS]")
True
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer as Engine
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from qkv.errors import TokenizerError, UsageError
from qkv.tokenizer.base import Tokenizer

# GPT-2's single special token, which serves as both beginning and end of text.
BPE_SPECIAL_TOKENS = ("<|endoftext|>",)
# BERT's special tokens, in the order of bert-base-uncased's vocab.txt roles.
WORDPIECE_ROLES = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def train_tokenizer(
    *,
    kind: Literal["bpe", "wordpiece"] = "bpe",
    vocab_size: int,
    files: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    texts: Iterable[str] | None = None,
    special_tokens: Sequence[str] | None = None,
    min_frequency: int = 2,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a tokenizer on text ``files`` or an iterable of ``texts`` (exactly one of the two).

    ``kind="bpe"``: byte-level BPE as GPT-2 (every byte is in the initial alphabet, so no text is
    ever unknown). ``special_tokens`` default to ``["<|endoftext|>"]``; the first one is the bos and
    eos token, as in GPT-2. ``kind="wordpiece"``: BERT's WordPiece with ``##`` continuations,
    ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4, then any extra ``special_tokens``), a normaliser that
    lowercases (``lowercase``) and strips accents (``strip_accents``; None: when lowercasing, as
    BERT), and ``[CLS] … [SEP]`` added on encode. ``show_progress`` draws the engine's progress bar.
    """
    if (files is None) == (texts is None):
        raise UsageError("give exactly one of files= (paths of text files) or texts= (an iterable of strings)")
    if kind == "bpe":
        engine, trainer, roles = _byte_level_bpe(vocab_size, special_tokens, min_frequency, show_progress)
    elif kind == "wordpiece":
        engine, trainer, roles = _wordpiece(
            vocab_size, special_tokens, min_frequency, lowercase, strip_accents, show_progress
        )
    else:
        raise UsageError(f"kind must be 'bpe' or 'wordpiece', got {kind!r}")

    if files is not None:
        paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not paths:
            raise UsageError("files= is empty; give at least one text file to train on")
        for path in paths:
            if not Path(path).is_file():
                raise TokenizerError(f"training file {path} does not exist or is not a file")
        engine.train([str(p) for p in paths], trainer)
    else:
        if isinstance(texts, str):
            raise UsageError("texts= must be an iterable of strings, not one string; wrap it in a list")
        length = len(texts) if isinstance(texts, Sequence) else None
        engine.train_from_iterator(texts, trainer, length=length)

    if kind == "wordpiece":
        cls, sep = roles["cls_token"], roles["sep_token"]
        engine.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0",
            pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, engine.token_to_id(cls)), (sep, engine.token_to_id(sep))],
        )
    return Tokenizer(engine, special_tokens=roles, source_format="trained")


def _byte_level_bpe(
    vocab_size: int, special_tokens: Sequence[str] | None, min_frequency: int, show_progress: bool
) -> tuple[Engine, trainers.Trainer, dict[str, str]]:
    specials = list(special_tokens) if special_tokens is not None else list(BPE_SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise UsageError(
            f"vocab_size {vocab_size} is too small for byte-level BPE: the 256 bytes and "
            f"{len(specials)} special tokens need at least {len(alphabet) + len(specials)}"
        )
    engine = Engine(models.BPE())
    engine.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    engine.decoder = decoders.ByteLevel()
    engine.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    roles = {"bos_token": specials[0], "eos_token": specials[0]} if specials else {}
    return engine, trainer, roles


def _wordpiece(
    vocab_size: int,
    special_tokens: Sequence[str] | None,
    min_frequency: int,
    lowercase: bool,
    strip_accents: bool | None,
    show_progress: bool,
) -> tuple[Engine, trainers.Trainer, dict[str, str]]:
    specials = list(WORDPIECE_ROLES.values())
    specials += [t for t in special_tokens or () if t not in specials]
    if vocab_size <= len(specials):
        raise UsageError(f"vocab_size {vocab_size} must exceed the {len(specials)} special tokens")
    engine = Engine(models.WordPiece(unk_token=WORDPIECE_ROLES["unk_token"]))
    engine.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    engine.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    engine.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    return engine, trainer, dict(WORDPIECE_ROLES)
