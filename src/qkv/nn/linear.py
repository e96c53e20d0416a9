"""`Linear`: nn.Linear that runs bf16/fp16 inference on CPU through a oneDNN-prepacked weight.

A plain bf16 `F.linear` on CPU reaches about half the memory bandwidth that oneDNN gets from a
weight reordered once into its blocked layout (measured on AVX512-BF16: 2x for the matrix-vector
products of batch-1 decoding), with bit-identical results. So when no gradient is needed, the
weight is packed on first use and the packed copy is reused until the weight changes (its
version counter or storage moves). Set `QKV_PACKED_LINEAR=0` to turn packing off (it keeps a
second copy of each weight in memory) and with it the float32 training path below.

float32 training on CPU (train mode, gradients wanted) runs its three matmuls (forward, input and
weight gradients) through oneDNN too (`float32_linear`): torch's float32 matmul is MKL's, which on
AMD CPUs takes a code path about half as fast as oneDNN's AVX-512 one (`python
benchmarks/train.py --linear` times both). It is still float32 arithmetic (IEEE products, float32
accumulation), in another order. In eval mode the numbers stay torch's own.
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


@torch.library.custom_op("qkv::float32_matmul", mutates_args=())
def float32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] in oneDNN's float32 matmul, differentiable. A torch.library op, so
    that a compiled training step calls it as it is (inductor would lower the oneDNN linear as
    for frozen, prepacked weights)."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


@float32_matmul.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


def _save_operands(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _matmul_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    a, b = ctx.saved_tensors
    da = float32_matmul(grad, b.t()) if ctx.needs_input_grad[0] else None
    db = None
    if ctx.needs_input_grad[1]:  # a.t() @ grad [K, N]: oneDNN is faster with the shorter side as rows
        db = float32_matmul(a.t(), grad) if a.shape[1] <= grad.shape[1] else float32_matmul(grad.t(), a).t()
    return da, db


float32_matmul.register_autograd(_matmul_backward, setup_context=_save_operands)


def float32_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., K], w [N, K], b [N]) with the matmuls (forward, dx, dw) in oneDNN."""
    out = float32_matmul(x.reshape(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], w.shape[0])
    return out + b if b is not None else out


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
        if _AVAILABLE and w.device.type == "cpu" and x.dtype == w.dtype:
            grad = torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)
            if (
                grad
                and self.training  # in eval mode, forward numbers stay torch's own (parity tests, interpretation)
                and w.dtype == torch.float32
                and type(w) in (torch.Tensor, nn.Parameter)  # not a DTensor shard
                and not torch.is_autocast_enabled("cpu")  # autocast's linear runs in bfloat16
            ):
                return float32_linear(x, w, self.bias)
            # Compiled: inductor packs weights itself (freezing).
            if not grad and w.dtype in _PACKED_DTYPES and not torch.compiler.is_compiling():
                return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
        return F.linear(x, w, self.bias)
