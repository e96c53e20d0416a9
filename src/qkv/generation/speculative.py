"""Greedy speculative decoding (Leviathan et al. 2023; Chen et al. 2023, greedy acceptance).

A small draft model proposes k tokens one by one with its own KV cache; the target model scores
the last accepted token and all k proposals in one forward. The longest prefix of proposals that
equals the target's own argmax is accepted, followed by the target's argmax after it (a correction,
or a bonus token when all k agree). Each round so costs one target forward and yields 1..k+1
tokens that are exactly the target's greedy tokens.

Rolling back: after a round both caches keep only the accepted positions, which for a full-length
cache is moving `pos` back. A sliding-window ring cannot be rolled back that way (the rejected
tokens overwrote slots the window still needs), so speculative decoding gives every model a
full-length cache: a sliding-window model still attends within its window, because the attention
mask applies the window; only the ring's memory bound is given up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from qkv.cache import KVCache
from qkv.generation.decode import context_budget, is_encoder_decoder, prefill, resolve_eos
from qkv.generation.options import GenerationConfig


@dataclass
class SpeculativeStats:
    """Counters of one `speculative_generate` call."""

    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # of those, tokens the target agreed with
    target_forwards: int = 0  # target model calls, prefill included
    draft_forwards: int = 0  # draft model calls, prefill included

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def full_length_cache(model: torch.nn.Module, max_len: int) -> KVCache:
    """A cache of `max_len` slots without a sliding-window ring, so it can be rolled back by `pos`."""
    cfg = dataclasses.replace(model.config, sliding_window=None)
    return KVCache(cfg, 1, max_len, model.dtype, model.device)


def _argmax_after(model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache, keep: int = 1) -> torch.Tensor:
    """Feed tokens [1, n] at the cache's next slots; return the argmax after each of the last `keep`: [keep]."""
    return model.decode(tokens, cache, logits_to_keep=keep)[0].argmax(-1)


@torch.no_grad()
def speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int | None = None,
    *,
    config: GenerationConfig | None = None,
    num_draft_tokens: int = 4,
    **options: Any,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Target's greedy continuation of input_ids [1, T], sped up by a draft -> ([1, T + n], stats).

    The tokens equal `generate(target, input_ids, ...)` (greedy): the draft only changes how
    many target forwards they cost. Both models must share a vocabulary. The options (a
    `GenerationConfig` and/or keywords) may set only max_new_tokens and the EOS/pad ids (EOS
    default: the target's; [] for none); anything else is refused.
    """
    config = GenerationConfig.build(config, max_new_tokens=max_new_tokens, **options)
    config.check_supported("speculative")
    if is_encoder_decoder(target) or is_encoder_decoder(draft):
        raise ValueError("speculative decoding supports decoder-only models; use generate() for encoder-decoders")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be one non-empty prompt of shape [1, T], got {tuple(input_ids.shape)}")
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be an integer >= 1")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"draft vocabulary ({draft.config.vocab_size}) differs from the target's ({target.config.vocab_size}); "
            "speculative decoding needs a draft with the target's tokenizer"
        )
    T = input_ids.shape[1]
    limits = [lim for lim in (target.config.context_limit, draft.config.context_limit) if lim is not None]
    n_new = context_budget(min(limits, default=None), T, config.max_new_tokens)
    eos = set(resolve_eos(config, target))

    stats = SpeculativeStats()
    target_cache, draft_cache = full_length_cache(target, T + n_new), full_length_cache(draft, T + n_new)
    first = int(prefill(target, input_ids, target_cache, chunk=config.prefill_chunk)[0].argmax(-1))
    stats.target_forwards += 1
    new = [first]  # generated tokens; the target cache holds every token but the last
    while len(new) < n_new and new[-1] not in eos:
        tokens = torch.cat((input_ids[0], torch.tensor(new, device=input_ids.device)))
        # Propose k tokens; k shrinks near the end so a round never overshoots n_new.
        k = min(num_draft_tokens, n_new - len(new) - 1)
        proposals: list[int] = []
        if k:
            unseen = tokens[draft_cache.pos :]  # the draft catches up on tokens it has not fed yet
            while len(proposals) < k:
                proposals.append(int(_argmax_after(draft, unseen[None], draft_cache)))
                stats.draft_forwards += 1
                unseen = tokens.new_tensor(proposals[-1:])
        # Verify: the target's argmax after the last token and after each proposal, in one forward.
        verify = tokens.new_tensor(new[-1:] + proposals)[None]  # (1, k + 1)
        greedy = _argmax_after(target, verify, target_cache, keep=k + 1).tolist()
        stats.target_forwards += 1
        n_ok = 0
        while n_ok < k and proposals[n_ok] == greedy[n_ok]:
            n_ok += 1
        stats.proposed += k
        stats.accepted += n_ok
        accepted = [*proposals[:n_ok], greedy[n_ok]]
        stop = next((i for i, tok in enumerate(accepted) if tok in eos), None)
        if stop is not None:  # an accepted run may carry tokens past an EOS
            new += accepted[: stop + 1]
            break
        new += accepted
        # Roll back to the accepted tokens: the target keeps all but the newest token.
        target_cache.pos = T + len(new) - 1
        draft_cache.pos = min(draft_cache.pos, T + len(new) - 1)
    return torch.cat((input_ids, input_ids.new_tensor(new)[None]), dim=1), stats
