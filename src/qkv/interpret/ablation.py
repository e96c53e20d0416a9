"""Head ablation: what changes when one attention head's output is zeroed.

A head's output is its slice of the input of the layer's output projection `o_proj` (the heads
are concatenated there, [B, T, n_heads * head_dim]), so zeroing that slice in a forward pre-hook
removes exactly that head, for every family and for grouped-query attention alike (o_proj reads
query heads; the shared key/value heads are untouched).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from qkv.errors import UsageError

# A model's one stack (an encoder-decoder's decoder), an encoder-decoder's encoder, its cross-attention;
# qkv.viz.attention_maps takes the same kinds.
KINDS = ("self", "encoder", "cross")
MEASURES = ("loss", "logits")


def attention_modules(model: nn.Module, kind: str = "self") -> list[nn.Module]:
    """The attention module of each layer: kind "self" for a model's one stack (an encoder-decoder's
    decoder), "encoder" and "cross" for an encoder-decoder's encoder and cross-attention."""
    if kind not in KINDS:
        raise UsageError(f"unknown attention kind {kind!r}; choose one of {', '.join(KINDS)}")
    seq2seq = getattr(model, "is_encoder_decoder", False)
    if kind != "self" and not seq2seq:
        raise UsageError(f"attention kind {kind!r} needs an encoder-decoder model; this one offers kind 'self'")
    stack = (model.encoder if kind == "encoder" else model.decoder) if seq2seq else model
    blocks = getattr(stack, "blocks", None)
    if blocks is None:
        raise UsageError(f"{type(model).__name__} has no transformer blocks to ablate (CLIP: pass model.vision)")
    return [block.cross_attn if kind == "cross" else block.attn for block in blocks]


def parse_head(text: str) -> tuple[int, int]:
    """'L.H' (e.g. '3.7') -> (layer, head)."""
    parts = text.split(".")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"a head is written LAYER.HEAD, e.g. 3.7 (layer 3, head 7); got {text!r}")
    return int(parts[0]), int(parts[1])


def _check_heads(modules: list[nn.Module], heads: Sequence[tuple[int, int]]) -> None:
    if not heads:
        raise UsageError("give at least one head to ablate, as (layer, head)")
    for layer, head in heads:
        if not 0 <= layer < len(modules):
            raise UsageError(
                f"head {layer}.{head}: layer {layer} out of range; the model has layers 0..{len(modules) - 1}"
            )
        n_heads = modules[layer].n_heads
        if not 0 <= head < n_heads:
            raise UsageError(f"head {layer}.{head}: head {head} out of range; layer {layer} has heads 0..{n_heads - 1}")


@contextmanager
def heads_zeroed(model: nn.Module, heads: Sequence[tuple[int, int]], kind: str = "self") -> Iterator[None]:
    """Within the block, the listed heads (layer, head) output zeros; the hooks go when it ends."""
    modules = attention_modules(model, kind)
    _check_heads(modules, heads)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def hook(zeroed: list[int], head_dim: int):
        def pre_hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0].clone()  # [B, T, n_heads * head_dim]
            for h in zeroed:
                x[..., h * head_dim : (h + 1) * head_dim] = 0
            return (x, *args[1:])

        return pre_hook

    handles = [
        modules[layer].o_proj.register_forward_pre_hook(hook(zeroed, modules[layer].head_dim))
        for layer, zeroed in by_layer.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _measure(model: nn.Module, input_ids: torch.Tensor, target_ids: torch.Tensor | None, measure: str) -> torch.Tensor:
    from qkv.models.decoder import next_token_loss

    if getattr(model, "is_encoder_decoder", False):
        out = model(input_ids, decoder_input_ids=target_ids)
        tokens = target_ids
    elif getattr(model.config, "family", None) == "vit":
        out, tokens = model(input_ids), None
    else:
        out, tokens = model(input_ids), input_ids if getattr(model, "lm_head", None) is not None else None
    if measure == "logits":
        if out.logits is None:
            raise UsageError(f"{type(model).__name__} has no head giving logits; ablation has nothing to measure")
        return out.logits.float()
    if tokens is None:
        raise UsageError(
            f"measure='loss' needs a language model (decoder or encoder-decoder); use measure='logits' for "
            f"{type(model).__name__}"
        )
    return next_token_loss(out.logits, tokens).float()


@torch.no_grad()
def ablate_heads(
    model: nn.Module,
    input_ids: torch.Tensor,
    heads: Sequence[tuple[int, int]],
    target_ids: torch.Tensor | None = None,
    kind: str = "self",
    measure: str = "loss",
) -> torch.Tensor:
    """The effect of zeroing each head (layer, head) on its own, as ablated minus intact.

    input_ids: [B, T] ([B, C, H, W] pixels for a ViT; an encoder-decoder's source, with its
    decoder tokens in target_ids [B, T']). measure "loss": the mean next-token loss over the text
    (the target for an encoder-decoder) -> [len(heads)]; measure "logits" -> [len(heads), *logits.shape].
    """
    if measure not in MEASURES:
        raise UsageError(f"unknown ablation measure {measure!r}; choose one of {', '.join(MEASURES)}")
    if getattr(model, "is_encoder_decoder", False) != (target_ids is not None):
        raise UsageError(
            "an encoder-decoder needs target_ids (the decoder's tokens); other models take input_ids alone"
        )
    _check_heads(attention_modules(model, kind), heads)
    intact = _measure(model, input_ids, target_ids, measure)
    changes = []
    for head in heads:
        with heads_zeroed(model, [head], kind):
            changes.append(_measure(model, input_ids, target_ids, measure) - intact)
    return torch.stack(changes)
