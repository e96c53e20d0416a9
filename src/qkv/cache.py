"""KV cache: preallocated per-layer key/value buffers written in place at the current slots.

Full-attention layers keep `[B, n_kv, max_len, head_dim]`; sliding-window layers keep a ring of
`window` slots (slot s lives at index s % window), so memory stays bounded however long the
generation runs. Encoder-decoder models also keep the cross-attention keys/values, computed once.
"""

from __future__ import annotations

import torch

from qkv.config import ModelConfig


class KVCache:
    """Keys/values of every layer for `batch_size` sequences of at most `max_len` slots."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        n_layers: int | None = None,
        static: bool = False,
    ) -> None:
        self.max_len = max_len
        # static: every layer keeps all `max_len` slots and attends over all of them (masked), so a
        # decode step has the same shapes every time and `torch.compile` captures it once.
        self.static = static
        sliding = cfg.sliding_window and cfg.sliding_window < max_len and not static
        self.window = cfg.sliding_window if sliding else None
        n_layers = n_layers or (cfg.n_decoder_layers if cfg.family == "seq2seq" else cfg.n_layers)
        size = self.window or max_len
        shape = (batch_size, cfg.n_kv_heads, size, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        # Absolute slot held at each ring index (-1: empty); only used for sliding-window layers.
        self.ring_slots = torch.full((size,), -1, dtype=torch.long, device=device) if self.window else None
        self.pos = 0  # slots written so far
        # Encoder-decoder models: what the decoder cross-attends to, set once per request by
        # `set_context`; each layer's keys/values of it are computed on first use and kept.
        self.context: torch.Tensor | None = None  # [B, S, D] encoder output
        self.context_mask: torch.Tensor | None = None  # [B, S] 1/0, None when nothing is padded
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_context(self, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> None:
        """Keep the encoder output [B, S, D] (and its padding mask [B, S]) for cross-attention."""
        self.context, self.context_mask = context, context_mask
        self.cross_kv = {}

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def slots(self, n_new: int, input_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(query slots [T], key slots [S]) of the next forward of `n_new` tokens.

        The key slots are the absolute positions of the keys that `update` will return. A static
        cache attends over all of its slots (the causal mask hides the unwritten ones) and writes
        at `input_pos` [T], which the caller passes as a tensor so the step's shapes never change.
        `input_pos` [B, T] gives each row its own slots (a slot cache serving one request per row,
        `qkv.serve`); the query slots are then [B, T] too.
        """
        device = self.k[0].device
        if self.static:
            if input_pos is None:
                raise ValueError("a static KVCache is written at explicit slots: pass input_pos [T]")
            return input_pos, torch.arange(self.max_len, device=device)
        new = torch.arange(self.pos, self.pos + n_new, device=device)
        if self.window:
            return new, torch.cat((self.ring_slots, new))
        return new, torch.arange(self.pos + n_new, device=device)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, KV, T, hd] for the next T slots (static: at `input_pos`); return all
        keys/values to attend to."""
        T = k.shape[2]
        if self.static:
            if input_pos.dim() == 2:  # per row: row b writes its T tokens at input_pos[b]
                # index_put_, not scatter_: inductor writes it in place, where a compiled scatter_
                # copied the whole buffer every step (51 ms against 0.03 ms for 4 layers' worth).
                rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
                self.k[layer][rows, :, input_pos] = k.transpose(1, 2)  # indexed as (B, T, KV, hd)
                self.v[layer][rows, :, input_pos] = v.transpose(1, 2)
            else:
                self.k[layer].index_copy_(2, input_pos, k)
                self.v[layer].index_copy_(2, input_pos, v)
            return self.k[layer], self.v[layer]
        if self.pos + T > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions but {self.pos + T} are needed; "
                "allocate a larger cache (max_len) or generate fewer tokens"
            )
        kb, vb = self.k[layer], self.v[layer]
        if not self.window:
            kb[:, :, self.pos : self.pos + T] = k
            vb[:, :, self.pos : self.pos + T] = v
            return kb[:, :, : self.pos + T], vb[:, :, : self.pos + T]
        k_all, v_all = torch.cat((kb, k), dim=2), torch.cat((vb, v), dim=2)  # (B, KV, W + T, hd)
        keep = min(T, self.window)  # only the newest `window` slots can ever be seen again
        idx = torch.arange(self.pos + T - keep, self.pos + T, device=k.device) % self.window
        kb.index_copy_(2, idx, k[:, :, T - keep :])
        vb.index_copy_(2, idx, v[:, :, T - keep :])
        return k_all, v_all

    def row_view(self, row: int, length: int | None = None) -> KVCache:
        """A static cache over row `row` and its first `length` slots (default: all), sharing this
        cache's storage: a forward through it (batch 1, input_pos [T]) writes into that row only and
        attends over `length` slots, not all of them (the chunked prefill of one slot of a
        `qkv.serve` engine while the other rows decode)."""
        if not self.static:
            raise ValueError("row_view needs a static KVCache (static=True)")
        length = self.max_len if length is None else length
        if not 0 < length <= self.max_len or not 0 <= row < self.batch_size:
            raise ValueError(
                f"row_view({row}, {length}) is outside the cache's {self.batch_size} rows x {self.max_len} slots"
            )
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.k = [k[row : row + 1, :, :length] for k in self.k]
        view.v = [v[row : row + 1, :, :length] for v in self.v]
        view.max_len = length
        view.cross_kv = {}
        return view

    def advance(self, n_new: int) -> None:
        """Mark `n_new` slots as written (called once per forward, after every layer updated)."""
        if self.window:
            keep = min(n_new, self.window)
            slots = torch.arange(self.pos + n_new - keep, self.pos + n_new, device=self.ring_slots.device)
            self.ring_slots[slots % self.window] = slots
        self.pos += n_new

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder sequences along the batch (beam search): row i becomes row index[i]; the
        cross-attention context and its keys/values follow."""
        for buffers in (self.k, self.v):
            for i, buf in enumerate(buffers):
                buffers[i] = buf.index_select(0, index)
        self.cross_kv = {
            layer: (k.index_select(0, index), v.index_select(0, index)) for layer, (k, v) in self.cross_kv.items()
        }
        if self.context is not None:
            self.context = self.context.index_select(0, index)
        if self.context_mask is not None:
            self.context_mask = self.context_mask.index_select(0, index)
