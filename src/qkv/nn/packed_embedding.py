"""A token embedding read from the packed output head it is tied to.

A GGUF file that ties the output head to the token embeddings stores one table (SmolLM2: Q8_0).
The head keeps it packed as a `QuantLinear`, and a dense copy for the lookup would be the largest
tensor in memory (SmolLM2 in bfloat16: 56 MB, a quarter of the model). `TiedPackedEmbedding`
dequantizes only the rows a forward asks for, from the head's own values, to exactly the numbers
the dense copy would hold: the file's value times its scale in float32, rounded once.
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.nn.quant import QuantLinear


class TiedPackedEmbedding(nn.Module):
    """`nn.Embedding`'s forward (ids [...] -> [..., dim]) over a tied packed head's rows.

    The head is referenced, not owned: it stays the model's `lm_head` (one copy, one state-dict
    entry). `weight` and the state dict give the dense table, built on demand, so a saved model is
    the same as one loaded with a dense table.
    """

    def __init__(self, head: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self._head = (head,)  # a tuple: not a submodule, so not saved or moved twice
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype

    @property
    def head(self) -> QuantLinear:
        return self._head[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [...] -> [..., embedding_dim] in `self.dtype`."""
        flat = input_ids.reshape(-1)
        return self.head.rows(flat, self.dtype).view(*input_ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table [num_embeddings, embedding_dim], dense (built anew at each access)."""
        return self.head.rows(torch.arange(self.num_embeddings), self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the tied packed head, {self.dtype}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _apply(self, fn, recurse=True):
        """`model.to(dtype)` changes the dtype rows come out in, as it would cast a dense table."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)
