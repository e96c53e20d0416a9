"""The static-shape decode step, eager or compiled once with `torch.compile`.

A static `KVCache` keeps every slot and is written at a position *tensor*, and the model's mask
is built densely from that tensor, so every decode step has the same shapes and reads no
Python-side position: inductor captures it once per model, batch size and cache size. Weights
are frozen into the graph (so oneDNN prepacks them): for inference with fixed weights only.
"""

from __future__ import annotations

import functools

import torch

from qkv.cache import KVCache


def static_logits(model: torch.nn.Module, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache):
    """Logits [B, T, V] of input_ids [B, T] written at slots input_pos [T] of a static cache."""
    return model.decode(input_ids, cache, input_pos=input_pos)


@functools.cache
def _compiled_static_logits():
    # One compiled function for every model: dynamo keeps a graph per model (guarded on the module),
    # batch size and cache size. Created on first use so importing qkv never touches inductor.
    return torch.compile(static_logits)


def static_cache_len(needed: int, limit: int | None) -> int:
    """The static cache length for `needed` slots: the next power of two >= 256, within the context,
    so that a handful of graphs serve every prompt length."""
    size = max(256, 1 << (needed - 1).bit_length())
    return size if limit is None else max(needed, min(size, limit))


class StaticStep:
    """Runs a model's static-shape step; `compile=True` goes through the compiled graph."""

    def __init__(self, model: torch.nn.Module, compile: bool = False) -> None:
        self.model = model
        self.compile = compile

    def new_cache(self, batch_size: int, needed: int) -> KVCache:
        """A static cache with room for `needed` slots (rounded up, see `static_cache_len`)."""
        return self.model.new_cache(batch_size, static_cache_len(needed, self.model.config.context_limit), static=True)

    def prefill(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Write the prompt [B, T] at slots 0..T-1 (eagerly: one shape per prompt length would
        otherwise compile a graph each); return the last position's logits [B, V]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return static_logits(self.model, input_ids, positions, cache)[:, -1]

    def step(self, token: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        """Feed token [B] at slot `position`; return logits [B, V]."""
        input_pos = torch.tensor([position], device=token.device)
        if not self.compile:
            return static_logits(self.model, token[:, None], input_pos, cache)[:, -1]
        import torch._inductor.config as inductor_config

        # Freezing is a global inductor setting; patch it only around our own graphs.
        with inductor_config.patch(freezing=True):
            return _compiled_static_logits()(self.model, token[:, None], input_pos, cache)[:, -1]
