"""The logit lens (nostalgebraist 2020): read each layer's hidden state through the final norm and
the LM head, as if the model stopped there, to see at which depth the prediction forms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkv.errors import UsageError


@dataclass(frozen=True)
class LogitLens:
    """token_ids, probs: [B, L, T, k], the top-k next tokens (and their probabilities) that layer
    l's output would predict at each position; layer L - 1 is the model's own prediction."""

    token_ids: torch.Tensor
    probs: torch.Tensor


@torch.no_grad()
def logit_lens(
    model: torch.nn.Module, input_ids: torch.Tensor, top_k: int = 5, last_positions: int | None = None
) -> LogitLens:
    """Top-k predictions of every layer of a decoder for input_ids [B, T] (for the last
    `last_positions` positions only when given: [B, L, last_positions, k]).

    One layer at a time, so the memory is one [B, T, V] of logits, not L of them.
    """
    _check(model, top_k)
    hidden = model(input_ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    return lens_of_hidden_states(model, hidden, top_k, last_positions)


def _check(model: torch.nn.Module, top_k: int) -> None:
    from qkv.models.decoder import DecoderLM

    if not isinstance(model, DecoderLM):
        raise UsageError(
            f"the logit lens reads a decoder's final norm and LM head; {type(model).__name__} is not a decoder LM"
        )
    if not 1 <= top_k <= model.config.vocab_size:
        raise UsageError(f"top_k must be in 1..{model.config.vocab_size} (the vocabulary), got {top_k}")


@torch.no_grad()
def lens_of_hidden_states(
    model: torch.nn.Module, hidden_states: tuple[torch.Tensor, ...], top_k: int = 5, last_positions: int | None = None
) -> LogitLens:
    """The logit lens of a forward already run with output_hidden_states=True (its n_layers + 1
    hidden states [B, T, D]), so that a caller who also wants the attention pays one forward."""
    _check(model, top_k)
    T = hidden_states[0].shape[1]
    if last_positions is not None and not 1 <= last_positions <= T:
        raise UsageError(f"last_positions must be in 1..{T} (the prompt's length), got {last_positions}")
    keep = T if last_positions is None else last_positions
    # hidden[l] is the input of block l; hidden[L] the last block's output, already through the final norm.
    outputs = [model.norm(h[:, T - keep :]) for h in hidden_states[1:-1]] + [hidden_states[-1][:, T - keep :]]
    ids, probs = [], []
    for h in outputs:
        p, i = model.lm_head(h).float().softmax(-1).topk(top_k, dim=-1)
        ids.append(i)
        probs.append(p)
    return LogitLens(token_ids=torch.stack(ids, 1), probs=torch.stack(probs, 1))
