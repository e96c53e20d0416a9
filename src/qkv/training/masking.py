"""Masked-LM inputs: choose tokens, corrupt them, predict the originals (Devlin et al. 2019, §3.1).

Each token that is not special and not padding is chosen with probability `mask_prob` (15%); a
chosen token becomes [MASK] 80% of the time, a random token 10%, and stays as it is 10%. The
labels hold the original id at the chosen positions and -100 elsewhere, so the loss counts only
those. With `whole_word=True` a word is chosen or not as a whole: WordPiece "##" continuation
pieces belong to the word before them (whole-word masking, BERT's 2019 release), and the
80/10/10 decision is still made per token, as there.

    masker = MaskedLMCollator.from_tokenizer(tokenizer, seed=0)
    batch = masker(loader.next_batch())   # {"input_ids", "attention_mask", "labels"}: [B, T]

The collator draws from a `torch.Generator` of its own, whose state the `Trainer` saves with a
checkpoint, so a resumed run masks exactly as an uninterrupted one. `masker.fixed()` masks each
batch by its content instead, for evaluation: the same validation blocks get the same masks at
every evaluation.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from qkv.errors import UsageError

IGNORE_INDEX = -100  # label of a position the loss skips (torch's cross_entropy default)


class MaskedLMCollator:
    """Blocks of token ids [B, T] -> {"input_ids", "attention_mask", "labels"} for masked-LM training.

    special_ids: never chosen (and never drawn as random replacements); pad_id: padding, never
    chosen, attention_mask 0; continuation: [vocab_size] bool, True for "##" pieces, needed by
    whole_word; cls_id: put in front of every block (BERT inputs start with [CLS]), so T grows by 1.
    """

    def __init__(
        self,
        vocab_size: int,
        mask_id: int,
        special_ids: Iterable[int] = (),
        pad_id: int | None = None,
        *,
        mask_prob: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        whole_word: bool = False,
        continuation: torch.Tensor | None = None,
        cls_id: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise UsageError(f"mask_prob={mask_prob} must be in (0, 1); BERT chooses 0.15 of the tokens")
        if min(mask_fraction, random_fraction) < 0.0 or mask_fraction + random_fraction > 1.0:
            raise UsageError(
                f"mask_fraction={mask_fraction} and random_fraction={random_fraction} must be >= 0 and sum to "
                "at most 1 (the rest of the chosen tokens stay unchanged); BERT uses 0.8 and 0.1"
            )
        if whole_word and continuation is None:
            raise UsageError("whole_word masking needs the continuation table ('##' pieces); use from_tokenizer")
        if continuation is not None and continuation.shape != (vocab_size,):
            raise UsageError(f"continuation must have shape [{vocab_size}], got {tuple(continuation.shape)}")
        self.vocab_size = vocab_size
        self.mask_id = mask_id
        self.pad_id = pad_id
        self.cls_id = cls_id
        self.mask_prob = mask_prob
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.whole_word = whole_word
        self.special = torch.zeros(vocab_size, dtype=torch.bool)  # [V]: never chosen
        for i in {*special_ids, mask_id, *(() if pad_id is None else (pad_id,))}:
            self.special[i] = True
        self.replacements = (~self.special).nonzero().squeeze(1)  # ids a random replacement is drawn from
        if not len(self.replacements):
            raise UsageError("every id of the vocabulary is special: nothing to mask")
        self.continuation = continuation.bool() if continuation is not None else None
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.by_content = False

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None, **options: Any) -> MaskedLMCollator:
        """A collator with the tokenizer's [MASK], [PAD], [CLS] and special tokens (qkv `Tokenizer`).

        vocab_size: the model's (default: the tokenizer's); options: as the constructor (mask_prob,
        whole_word, seed, ...). [CLS] is put in front of each block unless `cls_id=None` is given.
        """
        mask_token = getattr(tokenizer, "special_tokens", {}).get("mask_token")
        mask_id = tokenizer.token_to_id(mask_token) if mask_token else None
        if mask_id is None:
            raise UsageError(
                "the tokenizer has no mask token, which masked-LM training needs; train a WordPiece tokenizer "
                "(train_tokenizer(kind='wordpiece', ...) has [MASK]) or use one that defines mask_token"
            )
        vocab_size = vocab_size or tokenizer.vocab_size
        special_ids = [i for i in map(tokenizer.token_to_id, tokenizer.all_special_tokens) if i is not None]
        cls_token = tokenizer.special_tokens.get("cls_token")
        options.setdefault("cls_id", tokenizer.token_to_id(cls_token) if cls_token else None)
        if options.get("whole_word"):
            if tokenizer.kind != "wordpiece":
                raise UsageError(
                    f"whole-word masking reads WordPiece '##' continuations, but this tokenizer is {tokenizer.kind!r}; "
                    "use a WordPiece tokenizer or turn whole_word off"
                )
            options.setdefault("continuation", continuation_table(tokenizer, vocab_size))
        return cls(vocab_size, mask_id, special_ids, tokenizer.pad_token_id, **options)

    # -- state ------------------------------------------------------------------------------------
    def fixed(self) -> MaskedLMCollator:
        """A copy whose masks depend only on (seed, batch content): for evaluation batches."""
        twin = copy.copy(self)
        twin.generator, twin.by_content = torch.Generator(), True
        return twin

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])

    def _generator_for(self, ids: torch.Tensor) -> torch.Generator:
        if not self.by_content:
            return self.generator
        digest = zlib.crc32(ids.cpu().numpy().astype(np.int64).tobytes())
        mixed = np.random.SeedSequence([self.seed, digest]).generate_state(1, np.uint64)[0]
        return self.generator.manual_seed(int(mixed))

    # -- masking ----------------------------------------------------------------------------------
    def choose(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The positions to predict [B, T] (bool): each candidate token (or word) with prob mask_prob.

        At least one position per batch is chosen when any can be, so the loss is never an empty mean.
        """
        candidate = ~self.special[ids]
        B, T = ids.shape
        if self.whole_word:
            # A word starts at every token that is not a "##" piece (and at every special token).
            starts = ~self.continuation[ids] | ~candidate
            word = starts.long().cumsum(1)  # [B, T]: 1-based word index within the row
            draws = torch.rand(B, T + 1, generator=generator).gather(1, word)
        else:
            draws = torch.rand(B, T, generator=generator)
        chosen = (draws < self.mask_prob) & candidate
        if not chosen.any() and candidate.any():
            flat = candidate.flatten().nonzero().squeeze(1)
            pick = flat[torch.randint(len(flat), (1,), generator=generator)]
            chosen.view(-1)[pick] = True
        return chosen

    def __call__(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """blocks [B, T] -> input_ids (corrupted), attention_mask, labels (-100 = not chosen): [B, T(+1)]."""
        ids = blocks.long()
        if self.cls_id is not None:
            ids = torch.cat([ids.new_full((ids.shape[0], 1), self.cls_id), ids], dim=1)
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise UsageError(f"token ids must lie in [0, {self.vocab_size}) (the collator's vocab_size)")
        generator = self._generator_for(ids)
        chosen = self.choose(ids, generator)
        action = torch.rand(ids.shape, generator=generator)
        random_ids = self.replacements[torch.randint(len(self.replacements), ids.shape, generator=generator)]
        to_mask = chosen & (action < self.mask_fraction)
        to_random = chosen & ~to_mask & (action < self.mask_fraction + self.random_fraction)
        inputs = torch.where(to_mask, self.mask_id, torch.where(to_random, random_ids, ids))
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        attention_mask = (ids != self.pad_id).long() if self.pad_id is not None else torch.ones_like(ids)
        return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels}


def continuation_table(tokenizer: Any, vocab_size: int | None = None) -> torch.Tensor:
    """[vocab_size] bool: True for WordPiece continuation pieces ("##ing"), which extend the word before."""
    table = torch.zeros(vocab_size or tokenizer.vocab_size, dtype=torch.bool)
    for token, i in tokenizer.engine.get_vocab().items():
        if token.startswith("##") and i < len(table):
            table[i] = True
    return table


def masked_token_accuracy(batch: dict[str, torch.Tensor], out: Any) -> tuple[int, int]:
    """(correct, counted) argmax predictions at the chosen positions (labels != -100)."""
    labels = batch["labels"]
    chosen = labels != IGNORE_INDEX
    right = (out.logits.argmax(-1) == labels) & chosen
    return int(right.sum()), int(chosen.sum())
