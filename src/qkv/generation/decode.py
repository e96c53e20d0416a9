"""The decode loop: prefill the prompt into a KV cache, then one token per step.

`prefill` and `decode_one_token` are small free functions (as in gpt-fast) so the per-token step
stays lean and can be compiled. `decode_steps` strings them together into an iterator of
`Step`s (greedy or sampled, batched with left padding); `generate` collects it into a tensor,
and the text layer (`qkv.generation.text`) adds stop strings and streaming on top of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qkv.cache import KVCache
from qkv.generation.processors import LogitsProcessor, build_processors
from qkv.generation.sampling import sample_next_token


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] that skip left padding: 0 at each row's first real token."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: KVCache,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompt [B, T] through the model, filling the cache; return last-position logits [B, V]."""
    position_ids = positions_from_mask(attention_mask) if attention_mask is not None else None
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, logits_to_keep=1)
    return out.logits[:, -1]


def decode_one_token(
    model: torch.nn.Module,
    token: torch.Tensor,
    cache: KVCache,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one token per row (token: [B]) at the cache's next slot; return logits [B, V]."""
    position_ids = None
    if attention_mask is not None:
        position_ids = positions_from_mask(attention_mask)[:, -1:]
    out = model(token[:, None], attention_mask=attention_mask, position_ids=position_ids, cache=cache)
    return out.logits[:, -1]


@dataclass
class Step:
    """One decoding step for every row: the chosen tokens and, on request, their log-probabilities."""

    tokens: torch.Tensor  # [B]
    finished: torch.Tensor  # [B] bool: the row has emitted EOS (now or earlier)
    logprobs: torch.Tensor | None = None  # [B] log p(token) under the model's (unprocessed) distribution
    top_ids: torch.Tensor | None = None  # [B, N] the N most likely tokens
    top_logprobs: torch.Tensor | None = None  # [B, N] and their log-probabilities


def check_options(
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    num_return_sequences: int = 1,
    typical_p: float | None = None,
) -> None:
    """Raise ValueError naming the first option out of range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 means greedy decoding)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 or None disables it)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p={min_p} must be in [0, 1]")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1 disables it)")
    if typical_p is not None and not 0.0 < typical_p <= 1.0:
        raise ValueError(f"typical_p={typical_p} must be in (0, 1]")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences={num_return_sequences!r} must be an integer >= 1")


def sampling_setup(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    typical_p: float | None,
    repetition_penalty: float | None,
    frequency_penalty: float,
    presence_penalty: float,
    seed: int | None,
    prompt_len: int,
    device: torch.device,
) -> tuple[list[LogitsProcessor], torch.Generator | None, bool]:
    """(processors, seeded generator or None, greedy?) for a set of decoding options."""
    processors = build_processors(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        repetition=repetition_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        prompt_len=prompt_len,
    )  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    return processors, generator, temperature == 0.0


def eos_tensor(eos_token_id: int | list[int] | None, device: torch.device) -> torch.Tensor:
    """EOS ids as a 1-D tensor (possibly empty)."""
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def context_budget(model: torch.nn.Module, prompt_len: int, max_new_tokens: int) -> int:
    """How many tokens may be generated: max_new_tokens, capped by the context (error if the prompt
    alone does not fit)."""
    limit = model.config.context_limit
    if prompt_len == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. the BOS token)")
    if limit is not None and prompt_len > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens is longer than the model's context of {limit}; shorten the prompt"
        )
    return max_new_tokens if limit is None else min(max_new_tokens, limit - prompt_len)


def compiled_step(model: torch.nn.Module):
    """`model.static_step` compiled once per model with inductor, weights frozen as constants
    (so oneDNN prepacks them): for inference with fixed weights.

    Shapes depend on the batch size and the static cache length, which `static_cache_len` rounds
    to a power of two so that a handful of graphs serve every prompt length.
    """
    step = getattr(model, "_qkv_compiled_step", None)
    if step is None:
        import torch._inductor.config as inductor_config

        compiled = torch.compile(model.static_step)

        def step(*args):
            # Freezing is a global inductor setting; patch it only around our own graphs.
            with inductor_config.patch(freezing=True):
                return compiled(*args)

        model._qkv_compiled_step = step
    return step


def static_cache_len(needed: int, limit: int | None) -> int:
    """The static cache length for `needed` slots: the next power of two >= 256, within the context."""
    size = max(256, 1 << (needed - 1).bit_length())
    return size if limit is None else max(needed, min(size, limit))


@torch.no_grad()
def decode_steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    n_new: int,
    processors: list[LogitsProcessor],
    greedy: bool,
    generator: torch.Generator | None = None,
    eos: torch.Tensor | None = None,
    pad_token_id: int = 0,
    attention_mask: torch.Tensor | None = None,
    top_logprobs: int = 0,
    want_logprobs: bool = False,
    compile: bool = False,
) -> Iterator[Step]:
    """Yield one `Step` per generated position (at most n_new), stopping when every row finished.

    Finished rows keep receiving `pad_token_id`. The caller may stop iterating at any time; the
    cache is local to this iterator. `compile=True` runs each decode step through one compiled,
    static-shape graph (`DecoderLM.static_step`; the first call of a shape compiles, ~30 s).
    """
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: take the mask-free fast path
    if compile:
        if attention_mask is not None:
            raise ValueError("compile=True does not support left-padded batches yet; pass compile=False")
        size = static_cache_len(T + n_new, model.config.context_limit)
        cache = KVCache(model.config, B, size, model.dtype, device, static=True)
        step_fn = compiled_step(model)
        logits = model.static_step(input_ids, torch.arange(T, device=device), cache)[:, -1]
    else:
        cache = model.new_cache(B, T + n_new)
        logits = prefill(model, input_ids, cache, attention_mask)
    tokens = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(n_new):
        raw = logits
        for proc in processors:
            logits = proc(logits, tokens)
        nxt = sample_next_token(logits, generator, greedy=greedy)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        if eos is not None and len(eos):
            finished = finished | torch.isin(nxt, eos)
        out = Step(tokens=nxt, finished=finished)
        if want_logprobs or top_logprobs:
            logp = raw.float().log_softmax(dim=-1)
            out.logprobs = logp.gather(-1, nxt[:, None]).squeeze(-1)
            if top_logprobs:
                out.top_logprobs, out.top_ids = logp.topk(top_logprobs, dim=-1)
        yield out
        if bool(finished.all()) or step == n_new - 1:
            return
        if compile:
            logits = step_fn(nxt[:, None], torch.tensor([T + step], device=device), cache)[:, -1]
            continue
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, 1)), dim=1)
        logits = decode_one_token(model, nxt, cache, attention_mask)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    processors: list[LogitsProcessor] | None = None,
    compile: bool = False,
    **beam_options,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` after input_ids [B, T] -> [B * num_return_sequences, T + n].

    temperature=0 is greedy (argmax); otherwise tokens are sampled after the processors
    (repetition penalty, frequency/presence penalties, temperature, top-k, top-p, min-p, typical).
    `seed` makes sampling reproducible. `num_beams > 1` runs beam search (`qkv.generation.beam`).
    Rows that emitted an EOS id (default: the model config's) are padded with `pad_token_id`
    (default: the first EOS id) until every row has finished. Generation stops early at the
    model's context length. Left-padded batches pass `attention_mask` [B, T]; each row then equals
    generating it alone. `compile=True` decodes through one compiled static-shape step
    (no left padding; the first call of each shape compiles, ~30 s on 2 cores).
    """
    check_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, num_return_sequences, typical_p)
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} must be an integer >= 1")
    if num_beams > 1:
        from qkv.generation.beam import beam_search

        if temperature != 0.0:
            raise ValueError("beam search is deterministic: use temperature=0 with num_beams > 1")
        if compile:
            raise ValueError("compile=True applies to greedy and sampled decoding, not to beam search (num_beams > 1)")

        return beam_search(
            model, input_ids, num_beams=num_beams, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, attention_mask=attention_mask, num_return_sequences=num_return_sequences,
            **beam_options,
        )  # fmt: skip
    if beam_options:
        raise ValueError(f"options {sorted(beam_options)} only apply to beam search (num_beams > 1)")
    T = input_ids.shape[1]
    n_new = context_budget(model, T, max_new_tokens)
    if num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
    own, generator, greedy = sampling_setup(
        temperature, top_k, top_p, min_p, typical_p, repetition_penalty, frequency_penalty, presence_penalty, seed,
        T, input_ids.device,
    )  # fmt: skip
    processors = own if processors is None else processors
    eos = eos_tensor(eos_token_id, input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    steps = decode_steps(
        model, input_ids, n_new, processors, greedy, generator, eos, pad, attention_mask, compile=compile
    )
    new = [step.tokens for step in steps]
    if not new:  # the prompt already fills the context
        return input_ids
    return torch.cat((input_ids, torch.stack(new, dim=1)), dim=1)
