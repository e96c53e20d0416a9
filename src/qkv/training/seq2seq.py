"""Batches for encoder-decoder training through the same `Trainer`: noise objectives over token
blocks (T5 span corruption, BART denoising) and supervised (source, target) pairs.

Each collate turns rows of a 2-D tensor (what `BlockLoader` serves, so shuffling and exact resume
work unchanged) into `{"input_ids", "attention_mask", "labels"}` for `EncoderDecoder.forward`,
which feeds the labels shifted right to the decoder (teacher forcing); label padding is -100.
The noise collates draw from a generator of their own, saved with the run (`state_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qkv.errors import UsageError
from qkv.tokenizer.batch import pad_batch
from qkv.training.corruption import denoising, span_corruption


def seq2seq_batch(sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int) -> dict:
    """A teacher-forcing batch: padded sources with their mask, targets as labels (-100 on padding)."""
    input_ids, attention_mask = pad_batch(sources, pad_id)
    labels, label_mask = pad_batch(targets, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels.masked_fill(label_mask == 0, -100),
    }


class _NoiseCollate:
    """Shared by the noise objectives: a seeded generator, saved and restored with the run."""

    def __init__(self, pad_id: int, seed: int) -> None:
        self.pad_id = pad_id
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def fixed(self) -> _NoiseCollate:
        """A copy that draws the same noise at every call (for evaluation batches)."""
        import copy

        twin = copy.copy(self)
        start = self.generator.get_state()
        twin.generator = torch.Generator()
        twin._start = start
        return twin

    def _reset(self) -> None:
        if getattr(self, "_start", None) is not None:
            self.generator.set_state(self._start)

    def _rows(self, blocks: torch.Tensor) -> list[list[int]]:
        self._reset()
        if blocks.dim() != 2:
            raise UsageError(f"blocks must be [batch, length], got {tuple(blocks.shape)}")
        return [[t for t in row.tolist() if t != self.pad_id] for row in blocks]


class SpanCorruptionCollate(_NoiseCollate):
    """T5's objective over token blocks: 15% noise in spans of mean length 3, one sentinel each."""

    def __init__(
        self,
        sentinel_ids: Sequence[int],
        eos_id: int,
        pad_id: int,
        seed: int = 0,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
    ) -> None:
        super().__init__(pad_id, seed)
        self.sentinel_ids, self.eos_id = list(sentinel_ids), eos_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    def __call__(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        pairs = [
            span_corruption(row, self.sentinel_ids, self.eos_id, self.generator, self.noise_density,
                            self.mean_span_length)
            for row in self._rows(blocks)
        ]  # fmt: skip
        return seq2seq_batch([s for s, _ in pairs], [t for _, t in pairs], self.pad_id)


class DenoisingCollate(_NoiseCollate):
    """BART's objective over token blocks: sentence permutation, then Poisson-3 text infilling."""

    def __init__(
        self,
        mask_id: int,
        eos_id: int,
        pad_id: int,
        seed: int = 0,
        sentence_end_ids: Sequence[int] = (),
        mask_ratio: float = 0.3,
        poisson_lambda: float = 3.0,
    ) -> None:
        super().__init__(pad_id, seed)
        self.mask_id, self.eos_id, self.sentence_end_ids = mask_id, eos_id, list(sentence_end_ids)
        self.mask_ratio, self.poisson_lambda = mask_ratio, poisson_lambda

    def __call__(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        pairs = [
            denoising(row, self.mask_id, self.eos_id, self.generator, self.sentence_end_ids, self.mask_ratio,
                      self.poisson_lambda)
            for row in self._rows(blocks)
        ]  # fmt: skip
        return seq2seq_batch([s for s, _ in pairs], [t for _, t in pairs], self.pad_id)


def read_pairs(path, tokenizer: Any, eos_id: int) -> list[tuple[list[int], list[int]]]:
    """(source, target) ids from a file of `source<TAB>target` lines (each ending with EOS)."""
    from pathlib import Path

    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.count("\t") != 1:
            raise UsageError(
                f"{path}:{n}: expected one tab between the source and the target, found {line.count(chr(9))}"
            )
        source, target = line.split("\t")
        pairs.append(([*tokenizer.encode(source), eos_id], [*tokenizer.encode(target), eos_id]))
    if not pairs:
        raise UsageError(f"{path} holds no source<TAB>target lines")
    return pairs


def pack_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, max_source: int, max_target: int
) -> torch.Tensor:
    """Supervised pairs as one row each, [source padded to max_source | target padded to max_target],
    so `BlockLoader` can shuffle and resume them like blocks (`PairCollate` splits them again)."""
    if not pairs:
        raise UsageError("no (source, target) pairs given")
    rows = torch.full((len(pairs), max_source + max_target), pad_id, dtype=torch.long)
    for i, (src, tgt) in enumerate(pairs):
        if not src or not tgt or len(src) > max_source or len(tgt) > max_target:
            raise UsageError(
                f"pair {i} has a {len(src)}-token source and a {len(tgt)}-token target; each must be non-empty "
                f"and fit max_source={max_source} and max_target={max_target}"
            )
        rows[i, : len(src)] = torch.tensor(list(src))
        rows[i, max_source : max_source + len(tgt)] = torch.tensor(list(tgt))
    return rows


class PairCollate:
    """Rows packed by `pack_pairs` -> a teacher-forcing batch."""

    def __init__(self, max_source: int, pad_id: int) -> None:
        self.max_source, self.pad_id = max_source, pad_id

    def __call__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        strip = lambda part: [[t for t in r if t != self.pad_id] for r in part.tolist()]  # noqa: E731
        return seq2seq_batch(strip(rows[:, : self.max_source]), strip(rows[:, self.max_source :]), self.pad_id)
