"""`Linear`: nn.Linear that runs bf16/fp16 inference on CPU through a oneDNN-prepacked weight.

A plain bf16 `F.linear` on CPU reaches about half the memory bandwidth that oneDNN gets from a
weight reordered once into its blocked layout (measured on AVX512-BF16: 2x for the matrix-vector
products of batch-1 decoding), with bit-identical results. So when no gradient is needed, the
weight is packed on first use and the packed copy is reused until the weight changes (its
version counter or storage moves). Training and float32 take the ordinary path. Set
`QKV_PACKED_LINEAR=0` to turn packing off (it keeps a second copy of each weight in memory).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_PACKED_DTYPES = (torch.bfloat16, torch.float16)


def packing_available() -> bool:
    """Whether this torch build has the oneDNN linear ops and packing is not switched off."""
    return (
        os.environ.get("QKV_PACKED_LINEAR", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


_AVAILABLE = packing_available()


class Linear(nn.Linear):
    """Drop-in nn.Linear (same parameters and state-dict names) with a packed inference path."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._packed: torch.Tensor | None = None
        self._packed_key: tuple | None = None

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)  # a new tensor, or an in-place update, means a new packing
        if self._packed_key != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.compiler.is_compiling():
            return F.linear(x, w, self.bias)  # inductor packs weights itself (freezing)
        if (
            _AVAILABLE
            and w.dtype in _PACKED_DTYPES
            and x.dtype == w.dtype
            and w.device.type == "cpu"
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
        return F.linear(x, w, self.bias)
