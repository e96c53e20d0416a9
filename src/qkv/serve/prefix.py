"""The prefix cache: prompt-prefix KV kept across requests, so a shared system prompt is run once.

Prompts are cut into blocks of `block` tokens. A block's entry holds the keys/values of its tokens
(every layer) and is keyed by its parent entry (the blocks before it) and its own token ids, so an
entry stands for the whole prefix up to its end and a lookup walks the chain block by block. The
entries form an LRU bounded by `budget_tokens`; a lookup or insert touches a chain from its last
block to its first, so a parent is always more recent than its children and eviction takes leaves
first (a child whose parent is gone could never be found again).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qkv.cache import KVCache


@dataclass
class _Entry:
    id: int
    kv: torch.Tensor  # (L, 2, KV, block, hd): keys and values of the block's tokens, every layer


class PrefixCache:
    """An LRU of block-granular prompt-prefix KV within `budget_tokens` tokens."""

    def __init__(self, budget_tokens: int, block: int = 16) -> None:
        if block < 1:
            raise ValueError(f"block={block} must be >= 1")
        self.block = block
        self.max_blocks = max(budget_tokens, 0) // block
        self.entries: OrderedDict[tuple[int, tuple[int, ...]], _Entry] = OrderedDict()
        self._next_id = 1  # 0 is the root: the empty prefix

    @property
    def tokens(self) -> int:
        """Tokens whose KV the cache holds now."""
        return len(self.entries) * self.block

    def _chain(self, ids: Sequence[int], n_blocks: int) -> list[tuple[tuple[int, tuple[int, ...]], _Entry]]:
        parent, chain = 0, []
        for i in range(n_blocks):
            key = (parent, tuple(ids[i * self.block : (i + 1) * self.block]))
            entry = self.entries.get(key)
            if entry is None:
                break
            chain.append((key, entry))
            parent = entry.id
        return chain

    def _touch(self, keys: list[tuple[int, tuple[int, ...]]]) -> None:
        for key in reversed(keys):  # children first, so each parent ends more recent than its children
            self.entries.move_to_end(key)

    def lookup(self, ids: Sequence[int], limit: int) -> list[torch.Tensor]:
        """KV blocks (each (L, 2, KV, block, hd)) of the longest cached prefix of ids[:limit]."""
        if not self.max_blocks:
            return []
        chain = self._chain(ids, limit // self.block)
        self._touch([key for key, _ in chain])
        return [entry.kv for _, entry in chain]

    def copy_into(self, blocks: list[torch.Tensor], cache: KVCache, row: int) -> int:
        """Write cached blocks into slots 0.. of `row` of a static cache; return the tokens written."""
        if not blocks:
            return 0
        kv = torch.cat(blocks, dim=3)  # (L, 2, KV, n, hd)
        n = kv.shape[3]
        for layer in range(len(cache.k)):
            cache.k[layer][row, :, :n].copy_(kv[layer, 0])
            cache.v[layer][row, :, :n].copy_(kv[layer, 1])
        return n

    def insert(self, ids: Sequence[int], cache: KVCache, row: int) -> None:
        """Keep the KV of the whole blocks of `ids` (a prompt whose KV fills slots 0.. of `row`)."""
        n_blocks = min(len(ids) // self.block, self.max_blocks)
        if not n_blocks:
            return
        chain = self._chain(ids, n_blocks)
        keys = [key for key, _ in chain]
        self._touch(keys)  # protect the cached part from the evictions below
        start = len(chain)
        if start < n_blocks:
            s, e = start * self.block, n_blocks * self.block
            kv = torch.stack([torch.stack((k[row, :, s:e], v[row, :, s:e])) for k, v in zip(cache.k, cache.v)])
            parent = chain[-1][1].id if chain else 0
            for i, block_kv in enumerate(kv.split(self.block, dim=3)):
                while len(self.entries) >= self.max_blocks:
                    oldest = next(iter(self.entries))
                    if oldest in keys:  # only the chain itself is left: keep it, cache no more
                        return self._touch(keys)
                    del self.entries[oldest]
                j = start + i
                key = (parent, tuple(ids[j * self.block : (j + 1) * self.block]))
                entry = _Entry(self._next_id, block_kv.clone())
                self._next_id += 1
                self.entries[key] = entry
                keys.append(key)
                parent = entry.id
        self._touch(keys)
