"""Training data: text files -> one token stream -> fixed-length blocks -> shuffled batches.

Everything here is deterministic: the same files, tokenizer, seed and position give the same
batches, and `BlockLoader.state_dict()` is all a checkpoint needs to resume mid-epoch.

    corpus = load_corpus(["a.txt", "b.txt"], tokenizer, seq_len=128, val_fraction=0.1)
    loader = BlockLoader(corpus.train, batch_size=8, seed=0)
    batch = causal_lm_batch(loader.next_batch())   # {"input_ids": [8, 128], "labels": [8, 128]}
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkv.errors import UsageError


def corpus_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand `paths` into text files: files as given, directories as their `*.txt` files (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not found:
                raise FileNotFoundError(f"corpus directory {p} holds no *.txt files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus file {p} does not exist")
    if not files:
        raise UsageError("no corpus files given")
    return files


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added, with a qkv `Tokenizer` or a `tokenizers.Tokenizer`."""
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def tokenize_files(paths: Sequence[str | os.PathLike], tokenizer: Any, eos_id: int | None = None) -> torch.Tensor:
    """One token stream [N] (int32) of the files in order, `eos_id` after each file when given."""
    ids: list[int] = []
    for path in corpus_files(paths):
        ids.extend(encode_text(tokenizer, Path(path).read_text(encoding="utf-8")))
        if eos_id is not None:
            ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def pack_blocks(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a stream [N] into non-overlapping blocks [N // block_size, block_size]; the tail is dropped."""
    n = tokens.numel() // block_size
    return tokens[: n * block_size].view(n, block_size)


@dataclass
class Corpus:
    """Packed blocks of a token stream: `train` [N, T] and `val` [M, T] (M may be 0)."""

    train: torch.Tensor
    val: torch.Tensor


def split_blocks(tokens: torch.Tensor, block_size: int, val_fraction: float = 0.1) -> Corpus:
    """Pack a stream into blocks, keeping the last `val_fraction` of the stream for validation.

    The split is on the stream (as in nanoGPT), so no block straddles train and val. With
    `val_fraction > 0` validation gets at least one block.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction={val_fraction} must be in [0, 1)")
    n_blocks = tokens.numel() // block_size
    n_val = 0 if val_fraction == 0 else max(1, round(n_blocks * val_fraction))
    if n_blocks - n_val < 1:
        raise UsageError(
            f"the corpus has {tokens.numel()} tokens: too few for {n_val} validation block(s) and at "
            f"least one training block of {block_size} tokens; add text or lower seq_len / val_fraction"
        )
    cut = (n_blocks - n_val) * block_size
    return Corpus(train=pack_blocks(tokens[:cut], block_size), val=pack_blocks(tokens[cut:], block_size))


def load_corpus(
    paths: Sequence[str | os.PathLike],
    tokenizer: Any,
    seq_len: int,
    val_fraction: float = 0.1,
    eos_id: int | None = None,
) -> Corpus:
    """Tokenize text files and pack them into train/val blocks of `seq_len` tokens."""
    return split_blocks(tokenize_files(paths, tokenizer, eos_id), seq_len, val_fraction)


def causal_lm_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The causal-LM objective's batch: the model shifts labels itself (predict token t+1 from <= t)."""
    blocks = blocks.long()
    return {"input_ids": blocks, "labels": blocks}


def iter_blocks(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Blocks in order, `batch_size` at a time (the last batch may be smaller): for evaluation."""
    for i in range(0, len(blocks), batch_size):
        yield blocks[i : i + batch_size]


class BlockLoader:
    """Endless shuffled batches of blocks [B, T]; each epoch is a fresh permutation.

    The permutation of epoch `e` comes from a generator seeded from (`seed`, `e`) through NumPy's
    `SeedSequence` (which mixes them so nearby pairs give unrelated streams), so the position
    (`epoch`, `index` = batches already taken this epoch) fixes every later batch. An epoch's
    last partial batch is skipped to keep shapes static.

    `batch_size` is the global batch. Under N processes each rank calls `shard(rank, N)` (the
    `Trainer` does) and then reads only its own rows: rows [rank * B/N, (rank + 1) * B/N) of each
    global batch. The N shards side by side are exactly the single-process batch, so N processes
    see the same data in the same order as one, and the position stays world-size independent.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if blocks.dim() != 2:
            raise UsageError(f"blocks must have shape [n_blocks, block_size], got {tuple(blocks.shape)}")
        if not 1 <= batch_size <= len(blocks):
            raise UsageError(
                f"batch_size={batch_size} needs at least that many blocks, but there are {len(blocks)}; "
                "lower the batch size or the sequence length, or add text"
            )
        if seed < 0:
            raise UsageError(f"seed={seed} must be >= 0")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self.rank, self.world_size = 0, 1
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation)

    def shard(self, rank: int, world_size: int) -> None:
        """Read only rank `rank`'s share (batch_size / world_size rows) of every global batch."""
        from qkv.training.distributed import DistEnv, split_rows

        split_rows(self.batch_size, DistEnv(rank, world_size))
        self.rank, self.world_size = rank, world_size

    @property
    def local_batch_size(self) -> int:
        """Rows of each batch this process reads (batch_size / world_size)."""
        return self.batch_size // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self.blocks) // self.batch_size

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                mixed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]
                g = torch.Generator().manual_seed(int(mixed))
                perm = torch.randperm(len(self.blocks), generator=g)
            else:
                perm = torch.arange(len(self.blocks))
            self._order = (self.epoch, perm)
        return self._order[1]

    def next_batch(self) -> torch.Tensor:
        """The next batch [B, T] (this rank's [B / world_size, T] share when sharded); moves to the
        next epoch when this one is used up."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.batch_size + self.rank * self.local_batch_size
        batch = self.blocks[self._permutation()[start : start + self.local_batch_size]]
        self.index += 1
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The data position, plus the shape of the data it refers to (checked on load)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "n_blocks": len(self.blocks),
            "block_size": self.blocks.shape[1],
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; the data and batch size must be the ones it was saved with."""
        mine = self.state_dict()
        for key in ("n_blocks", "block_size", "batch_size"):
            if state[key] != mine[key]:
                raise UsageError(
                    f"cannot resume the data position: the checkpoint was taken with {key}={state[key]}, "
                    f"this run has {key}={mine[key]} (use the same corpus, tokenizer, seq_len and batch size)"
                )
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
        self._order = None
