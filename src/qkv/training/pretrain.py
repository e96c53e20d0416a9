"""Pretrain a model on text files: tokenizer, data, model, objective and `Trainer` wired together.

This is what `qkv train` runs. The objective decides the rest:

| objective | model | tokenizer trained | batch |
|---|---|---|---|
| `causal` (default) | a decoder preset (`DecoderLM`) | byte-level BPE | next-token prediction |
| `mlm` | an encoder preset with the MLM head | WordPiece | `MaskedLMCollator` (15%, 80/10/10) |
| `rtd` | ELECTRA: the preset as discriminator + a 1/4-size generator | WordPiece | the same masking |
| `span` | an encoder-decoder preset (e.g. tiny-t5) | byte-level BPE + sentinels | T5 span corruption |
| `denoise` | an encoder-decoder preset (e.g. tiny-bart) | byte-level BPE + `<mask>` | BART denoising |
| `seq2seq` | an encoder-decoder preset | byte-level BPE | `source<TAB>target` lines, teacher forcing |

A fresh run trains a tokenizer on the corpus (unless one is given), builds the preset with the
tokenizer's vocabulary, and trains. A resumed run takes the model and tokenizer from
`<out_dir>/checkpoint` and continues exactly where it stopped; give it the same corpus, objective,
preset, seq_len, batch_size and val_fraction as the original run (the objective and the preset's
model config are checked against the checkpoint's).

Under torchrun every rank runs this function: each builds the same tokenizer and model (same
files, same seed; checked), and the `Trainer` splits the work (`qkv.training.distributed`).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qkv.checkpoints.native import load_native, load_training_state
from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models import DecoderLM, Encoder, EncoderDecoder
from qkv.training import distributed
from qkv.training.data import BlockLoader, causal_lm_batch, corpus_files, load_corpus
from qkv.training.electra import ReplacedTokenDetection, generator_config, replaced_token_accuracy
from qkv.training.masking import MaskedLMCollator, masked_token_accuracy
from qkv.training.trainer import CHECKPOINT_DIR, Trainer, TrainingConfig

OBJECTIVES = ("causal", "mlm", "rtd", "span", "denoise", "seq2seq")
# The model family each objective trains, and the head its checkpoint has (rtd: the discriminator's).
OBJECTIVE_FAMILY = {"causal": "decoder", "mlm": "encoder", "rtd": "encoder"} | dict.fromkeys(
    ("span", "denoise", "seq2seq"), "seq2seq"
)
OBJECTIVE_HEAD = {"causal": "lm", "mlm": "mlm", "rtd": "rtd", "span": "lm", "denoise": "lm", "seq2seq": "lm"}
# Encoder-decoder vocabularies: EOS, padding (also the decoder's start, as T5), BART's mask, T5's sentinels.
SEQ2SEQ_SPECIALS = ("</s>", "<pad>", "<mask>", *(f"<extra_id_{i}>" for i in range(100)))


def seed_everything(seed: int) -> None:
    """Seed torch, Python `random` and NumPy (model init and anything else drawn from global RNGs)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def vocab_size_of(tokenizer: Any) -> int:
    """Vocabulary size of a qkv `Tokenizer` or a `tokenizers.Tokenizer` (added tokens included)."""
    if hasattr(tokenizer, "vocab_size"):
        return int(tokenizer.vocab_size)
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def get_tokenizer(
    source: Any,
    corpus: Sequence[str | os.PathLike],
    vocab_size: int,
    progress: bool = True,
    kind: str = "bpe",
    special_tokens: Sequence[str] | None = None,
) -> Any:
    """`source` as a tokenizer: None trains a `kind` tokenizer ("bpe" or "wordpiece") on the corpus,
    a path is loaded, anything else is used as is."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        return source
    from qkv.tokenizer import load_tokenizer, train_tokenizer

    if source is not None:
        return load_tokenizer(source)
    files = corpus_files(corpus)
    return train_tokenizer(
        kind=kind, vocab_size=vocab_size, files=files, show_progress=progress, special_tokens=special_tokens
    )


def tokenizer_on_every_rank(source: Any, corpus: Sequence[str | os.PathLike], vocab_size: int, progress: bool,
                            kind: str, special_tokens: Sequence[str] | None) -> Any:  # fmt: skip
    """`get_tokenizer`, except that under torchrun a tokenizer to train is trained by rank 0 alone
    and sent to the others (WordPiece training is not reproducible from one process to the next)."""
    if source is not None or not distributed.active():
        return get_tokenizer(source, corpus, vocab_size, progress, kind, special_tokens)
    from qkv.tokenizer import load_tokenizer

    files = None
    if distributed.is_main():
        tokenizer = get_tokenizer(None, corpus, vocab_size, progress, kind, special_tokens)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            files = {f.name: f.read_bytes() for f in Path(tmp).iterdir()}
    files = distributed.broadcast(files)
    if distributed.is_main():
        return tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_tokenizer(tmp)


def run_checkpoint(config: TrainingConfig, resume: bool) -> Path | None:
    """The checkpoint a resumed run continues from; for a fresh run, a check that none is there."""
    checkpoint = Path(config.out_dir) / CHECKPOINT_DIR if config.out_dir else None
    if resume:
        if checkpoint is None:
            raise UsageError("resume needs the run directory (out_dir) holding checkpoint/")
        return checkpoint
    if checkpoint is not None and checkpoint.exists():
        raise UsageError(
            f"{config.out_dir} already holds a run (checkpoint/); resume it or choose another run directory"
        )
    return None


def check_objective(objective: str, cfg: ModelConfig, preset: str | None = None) -> None:
    """Refuse an objective the config's model family cannot train (or an unknown objective)."""
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    want = OBJECTIVE_FAMILY[objective]
    if cfg.family != want:
        examples = "tiny-gpt2, tiny-llama" if want == "decoder" else "tiny-bert, electra-small"
        raise UsageError(
            f"objective {objective!r} trains family {want!r}, but preset {preset or '(this config)'!r} has family "
            f"{cfg.family!r}; choose a preset of family {want!r} (e.g. {examples})"
        )


# Fields a run sets from its tokenizer or objective, not from the preset.
_NOT_FROM_PRESET = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "head"}


def check_resume_matches(checkpoint: Path, model: nn.Module, objective: str, preset: str | None) -> None:
    """UsageError unless the run saved at `checkpoint` was started with this objective and preset:
    the objective saved with the run (and the model family and head it trains), and the preset's
    model config against the saved one."""
    saved = load_training_state(checkpoint).get("run_info", {}).get("objective")
    if saved is not None and saved != objective:
        raise UsageError(
            f"{checkpoint} is a run of objective {saved!r}, not {objective!r}; resume with --objective {saved}"
        )
    check_objective(objective, model.config, "(the checkpoint's)")
    if model.config.head != OBJECTIVE_HEAD[objective]:
        raise UsageError(
            f"{checkpoint} holds a model with head {model.config.head!r}, not one that objective {objective!r} "
            "trains; resume with the objective the run was started with"
        )
    if preset is None:
        return
    ours, theirs = ModelConfig.from_name(preset).to_dict(), model.config.to_dict()
    differ = sorted(
        k for k in ours.keys() | theirs.keys() if k not in _NOT_FROM_PRESET and ours.get(k) != theirs.get(k)
    )
    if differ:
        shown = ", ".join(f"{k}: saved {theirs.get(k)!r}, preset {ours.get(k)!r}" for k in differ[:6])
        raise UsageError(
            f"{checkpoint} was trained with a different model config than preset {preset!r} ({shown}); "
            "resume with the preset the run was started with"
        )


def build_pretraining_model(
    cfg: ModelConfig, objective: str, tokenizer: Any, generator_size: float = 0.25
) -> nn.Module:
    """The model `objective` trains from the preset config `cfg` (vocabulary already set)."""
    check_objective(objective, cfg)
    if objective == "causal":
        model = DecoderLM(cfg)
    elif OBJECTIVE_FAMILY[objective] == "seq2seq":
        model = EncoderDecoder(cfg)
    elif objective == "mlm":
        model = Encoder(cfg.replace(head="mlm"))
    else:
        discriminator = Encoder(cfg.replace(head="rtd"))
        discriminator.tokenizer = tokenizer
        return ReplacedTokenDetection(discriminator, Encoder(generator_config(discriminator.config, generator_size)))
    model.tokenizer = tokenizer
    return model


def pretrain(
    corpus: Sequence[str | os.PathLike],
    preset: str,
    config: TrainingConfig,
    *,
    objective: str = "causal",
    seq_len: int | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    resume: bool = False,
    mask_prob: float = 0.15,
    whole_word: bool = False,
) -> Trainer:
    """Train a `preset` model with `objective` on `corpus` (text files or directories of *.txt) -> the `Trainer`.

    seq_len: tokens per sequence (default: min(256, the preset's max_seq_len)); tokenizer: a
    tokenizer, a path to one, or None to train one with `vocab_size` (default: the preset's)
    entries; resume: continue from `<config.out_dir>/checkpoint` (model and tokenizer come from
    there); mask_prob, whole_word: the masking of `mlm` and `rtd` (`MaskedLMCollator`).
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    distributed.init()
    checkpoint = run_checkpoint(config, resume)
    if checkpoint is not None:
        from qkv.checkpoints.sharded import recover_unfinished_saves

        recover_unfinished_saves(checkpoint, report=True)
        saved_objective = load_training_state(checkpoint).get("run_info", {}).get("objective")
        rtd = (saved_objective or objective) == "rtd"
        model = ReplacedTokenDetection.from_checkpoint(checkpoint) if rtd else load_native(checkpoint)
        check_resume_matches(checkpoint, model, objective, preset)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise UsageError(f"{checkpoint} has no tokenizer.json, so the corpus cannot be re-encoded for resume")
    else:
        seed_everything(seed)
        cfg = ModelConfig.from_name(preset)
        check_objective(objective, cfg, preset)
        seq2seq = OBJECTIVE_FAMILY[objective] == "seq2seq"
        kind = "bpe" if objective == "causal" or seq2seq else "wordpiece"
        specials = SEQ2SEQ_SPECIALS if seq2seq else None
        # (for seq2seq the corpus is the pairs file: its text trains the tokenizer too)
        tokenizer = tokenizer_on_every_rank(
            tokenizer, corpus, vocab_size or cfg.vocab_size, config.progress, kind, specials
        )
        if seq2seq:
            eos, pad = tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<pad>")
            if eos is None or pad is None:
                raise UsageError("an encoder-decoder objective needs a tokenizer with </s> and <pad> tokens")
            ids = dict(bos_token_id=None, eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=pad)
            cfg = cfg.replace(vocab_size=vocab_size_of(tokenizer), **ids)
        else:
            roles = ("bos_token_id", "eos_token_id") + (() if objective == "causal" else ("pad_token_id",))
            cfg = cfg.replace(vocab_size=vocab_size_of(tokenizer), **{r: getattr(tokenizer, r, None) for r in roles})
        distributed.same_on_all_ranks(_vocabulary(tokenizer), "the tokenizer")  # a given one, too
        model = build_pretraining_model(cfg, objective, tokenizer)
    max_len = model.config.max_seq_len
    seq_len = seq_len or min(256, max_len)
    if seq_len > max_len:
        raise UsageError(f"seq_len={seq_len} exceeds the model's context of {max_len} tokens (max_seq_len)")
    options: dict[str, Any] = {}
    if OBJECTIVE_FAMILY[objective] == "seq2seq":
        data, collate, options = _seq2seq_data(objective, corpus, tokenizer, model.config, seq_len, val_fraction, seed)
    elif objective == "causal":
        eos_id = getattr(tokenizer, "eos_token_id", None)
        data = load_corpus(corpus, tokenizer, seq_len, val_fraction, eos_id=eos_id)
        collate = causal_lm_batch
    else:
        # Files are joined with [SEP] between them; each block gets [CLS] in front (so seq_len - 1 here).
        collate = MaskedLMCollator.from_tokenizer(
            tokenizer, model.config.vocab_size, mask_prob=mask_prob, whole_word=whole_word, seed=seed
        )
        sep = tokenizer.special_tokens.get("sep_token")
        data = load_corpus(
            corpus, tokenizer, seq_len - 1, val_fraction, eos_id=tokenizer.token_to_id(sep) if sep else None
        )
        options = {
            "eval_collate": collate.fixed(),
            "accuracy": masked_token_accuracy if objective == "mlm" else replaced_token_accuracy,
        }
    loader = BlockLoader(data.train, batch_size, seed=seed)
    options["run_info"] = {"objective": objective, "preset": preset}
    if checkpoint is not None:
        trainer = Trainer.from_checkpoint(checkpoint, loader, data.val, collate, config=config, model=model, **options)
    else:
        trainer = Trainer(model, config, loader, data.val, collate, **options)
    trainer.train()
    return trainer


def _vocabulary(tokenizer: Any) -> list[tuple[str, int]] | None:
    """The (token, id) pairs (what must agree between ranks that each trained a tokenizer)."""
    engine = getattr(tokenizer, "engine", tokenizer)  # qkv's Tokenizer wraps a `tokenizers.Tokenizer`
    if not hasattr(engine, "get_vocab"):
        return None
    return sorted(engine.get_vocab(with_added_tokens=True).items())


def _seq2seq_data(
    objective: str,
    corpus: Sequence[str | os.PathLike],
    tokenizer: Any,
    cfg: ModelConfig,
    seq_len: int,
    val_fraction: float,
    seed: int,
) -> tuple[Any, Any, dict[str, Any]]:
    """(data, collate, Trainer options) of the encoder-decoder objectives."""
    from qkv.training.data import Corpus
    from qkv.training.seq2seq import DenoisingCollate, PairCollate, SpanCorruptionCollate, pack_pairs, read_pairs

    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    if objective == "seq2seq":
        if len(corpus) != 1:
            raise UsageError("--objective seq2seq reads one file of source<TAB>target lines (--corpus FILE)")
        rows = pack_pairs(read_pairs(corpus[0], tokenizer, eos), pad, seq_len, seq_len)
        n_val = int(len(rows) * val_fraction)
        data = Corpus(train=rows[n_val:], val=rows[:n_val])
        return data, PairCollate(seq_len, pad), {}
    # The noise adds sentinels / EOS, so blocks leave room for them within the model's positions.
    data = load_corpus(corpus, tokenizer, seq_len - 2, val_fraction, eos_id=eos)
    if objective == "span":
        sentinels = [tokenizer.token_to_id(f"<extra_id_{i}>") for i in range(100)]
        collate = SpanCorruptionCollate(sentinels, eos, pad, seed=seed)
    else:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        ends = [i for token, i in vocab.items() if token.rstrip("Ċ").endswith((".", "!", "?"))]
        collate = DenoisingCollate(tokenizer.token_to_id("<mask>"), eos, pad, seed=seed, sentence_end_ids=ends)
    return data, collate, {"eval_collate": collate.fixed()}
