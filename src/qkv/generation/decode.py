"""The decode loop: prefill the prompt into a KV cache, then one token per step.

`prefill` and `decode_one_token` are small free functions (as in gpt-fast) so the per-token step
stays lean and can be compiled. `decode_steps` strings them together into an iterator of
`Step`s (greedy or sampled, batched with left padding). The model is anything that meets
`qkv.models.protocol.GenerativeModel`; this module knows no model class.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qkv.cache import KVCache
from qkv.errors import UsageError
from qkv.generation.constrained import JsonSchemaProcessor
from qkv.generation.context import describe_context, prompt_spans
from qkv.generation.options import GenerationConfig
from qkv.generation.processors import LogitsProcessor, build_processors
from qkv.generation.sampling import sample_next_token
from qkv.generation.static_step import StaticStep, auto_compile
from qkv.generation.stopping import StopStrings


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] that skip left padding: 0 at each row's first real token."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """Whether the prompt is an encoder input (True) or the decoder's own prefix (False)."""
    return bool(getattr(model, "is_encoder_decoder", False))


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: KVCache,
    attention_mask: torch.Tensor | None = None,
    chunk: int | None = GenerationConfig.prefill_chunk,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed the prompt [B, T] -> (last-position logits [B, V], the sequence being continued [B, P]).

    A decoder continues the prompt itself, filling the cache `chunk` tokens per forward (None:
    all at once): each chunk attends to the cache and to itself, so the prefill's activations
    grow with the chunk and only its attention scores [chunk, T] with the prompt, and logits are
    computed for the last position only. A prompt past a dynamic-NTK model's trained length runs
    in one forward (`prompt_spans`). An encoder-decoder encodes the prompt into the cache's
    cross-attention context and continues [decoder_start_token_id].
    """
    if is_encoder_decoder(model):
        model.encode(input_ids, attention_mask, cache=cache)
        prefix = model.decoder_start_ids(input_ids.shape[0])
        return model.decode(prefix, cache, logits_to_keep=1)[:, -1], prefix
    position_ids = positions_from_mask(attention_mask) if attention_mask is not None else None
    for start, end in prompt_spans(model.config, input_ids.shape[1], chunk):
        mask = attention_mask[:, :end] if attention_mask is not None else None  # [B, past + chunk]
        positions = position_ids[:, start:end] if position_ids is not None else None
        logits = model.decode(input_ids[:, start:end], cache, mask, positions, logits_to_keep=1)
    return logits[:, -1], input_ids


def start_decoding(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    n_new: int,
    attention_mask: torch.Tensor | None = None,
    chunk: int | None = GenerationConfig.prefill_chunk,
) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prefill the prompt (`chunk` tokens per forward, see `prefill`) into a new cache with room
    for `n_new` more tokens -> (cache, last-position logits [B, V], the sequence being continued
    [B, P], the padding mask decoding goes on with).

    A mask without padding becomes None (the mask-free fast path); an encoder-decoder's mask was
    its encoder's, and every decoder row starts alike, so decoding goes on without one.
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    seq2seq = is_encoder_decoder(model)
    cache = model.new_cache(input_ids.shape[0], (1 if seq2seq else input_ids.shape[1]) + n_new)
    logits, prefix = prefill(model, input_ids, cache, attention_mask, chunk)
    return cache, logits, prefix, None if seq2seq else attention_mask


def pad_id(config: GenerationConfig, eos: tuple[int, ...]) -> int:
    """What finished rows receive: config.pad_token_id, else the first EOS id, else 0."""
    return config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)


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
    return model.decode(token[:, None], cache, attention_mask, position_ids)[:, -1]


def generation_budget(model: torch.nn.Module, prompt_len: int, max_new_tokens: int) -> int:
    """`context_budget` for a model: an encoder-decoder's decoder continues one start token (its
    encoder checks the prompt's length against its own positions)."""
    if is_encoder_decoder(model):
        if prompt_len == 0:
            raise UsageError("the prompt is empty; give at least one token (e.g. the EOS token)")
        prompt_len = 1
    cfg = model.config
    return context_budget(cfg.context_limit, prompt_len, max_new_tokens, describe_context(cfg))


def context_budget(limit: int | None, prompt_len: int, max_new_tokens: int, context: str | None = None) -> int:
    """How many tokens may be generated after a prompt: max_new_tokens, capped so that prompt and
    generated tokens together fit the context `limit` (None: unbounded; `context`: how an error
    names it, default the number).

    The one rule every decoding path uses: the prompt must leave room for at least one new token.
    """
    if prompt_len == 0:
        raise UsageError("the prompt is empty; give at least one token (e.g. the BOS token)")
    if limit is not None and prompt_len >= limit:
        raise UsageError(
            f"prompt of {prompt_len} tokens leaves no room in the model's context of {context or limit} "
            "(prompt + generated tokens must fit); shorten the prompt"
        )
    return max_new_tokens if limit is None else min(max_new_tokens, limit - prompt_len)


def resolve_eos(config: GenerationConfig, model: torch.nn.Module, tokenizer: object = None) -> tuple[int, ...]:
    """The EOS ids to stop at: the config's, else the tokenizer's, else the model config's (may be empty)."""
    if config.eos_token_id is not None:
        return config.eos_token_id
    for source in (getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id):
        if source is not None:
            return (source,) if isinstance(source, int) else tuple(source)
    return ()


def sampling_setup(
    config: GenerationConfig, prompt_len: int, device: torch.device
) -> tuple[list[LogitsProcessor], torch.Generator | None]:
    """(processors, seeded generator or None) for a set of decoding options."""
    processors = build_processors(config, prompt_len=prompt_len)
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    return processors, generator


@dataclass
class Step:
    """One decoding step for every row: the chosen tokens and, on request, their log-probabilities."""

    tokens: torch.Tensor  # [B]
    finished: torch.Tensor  # [B] bool: the row has ended (EOS or stop string, now or earlier)
    eos: torch.Tensor  # [B] bool: this step's token is an EOS (it is not part of the text)
    logprobs: torch.Tensor | None = None  # [B] log p(token) under the model's (unprocessed) distribution
    top_ids: torch.Tensor | None = None  # [B, N] the N most likely tokens
    top_logprobs: torch.Tensor | None = None  # [B, N] and their log-probabilities


@torch.no_grad()
def decode_steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    n_new: int,
    eos: tuple[int, ...] = (),
    attention_mask: torch.Tensor | None = None,
    processors: list[LogitsProcessor] | None = None,
    stop: StopStrings | None = None,
    compile: bool | None = None,
    tokenizer: Any = None,
) -> Iterator[Step]:
    """Yield one `Step` per generated position (at most n_new), stopping when every row finished.

    For an encoder-decoder the steps continue the decoder's start token, not the prompt.
    Finished rows keep receiving the pad id (config.pad_token_id, else the first EOS id, else 0).
    `stop` ends a row once its generated text contains a stop string (the token that completed it
    is kept). The caller may stop iterating at any time; the cache is local to this iterator.
    `compile=True` runs every step through one compiled static-shape graph (`StaticStep`); None
    (the default) does so where it pays, see `auto_compile` (packed quantized decoders).
    `config.json_schema` puts a `JsonSchemaProcessor` over `tokenizer` (default: model.tokenizer)
    before the other processors (custom ones too): the sampling filters then see only tokens the
    schema allows, and the grammar ends each row with an EOS once its document is complete.
    """
    B = input_ids.shape[0]
    device = input_ids.device
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    pad = pad_id(config, eos)
    grammar = None
    if config.json_schema is not None:  # built, and so checked, before the prompt is run
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        grammar = JsonSchemaProcessor(config.json_schema, tokenizer, eos)
    static = None
    if compile is None:
        compile = auto_compile(model, attention_mask)
    if compile:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("compile=True does not support left-padded batches yet; pass compile=False")
        if is_encoder_decoder(model):
            raise ValueError("compile=True does not support encoder-decoder models yet; pass compile=False")
        static = StaticStep(model, compile=True)
        cache = static.new_cache(B, input_ids.shape[1] + n_new)
        logits, tokens, attention_mask = static.prefill(input_ids, cache, config.prefill_chunk), input_ids, None
    else:
        cache, logits, tokens, attention_mask = start_decoding(
            model, input_ids, n_new, attention_mask, config.prefill_chunk
        )
    T = tokens.shape[1]  # the sequence being continued: the prompt, or the decoder's start token
    own, generator = sampling_setup(config, T, device)
    processors = own if processors is None else processors
    if grammar is not None:
        processors = [grammar, *processors]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(n_new):
        raw = logits
        for proc in processors:
            logits = proc(logits, tokens)
        nxt = sample_next_token(logits, generator, greedy=config.greedy)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        hit_eos = torch.isin(nxt, eos_ids) & ~finished
        finished = finished | hit_eos
        if stop is not None:
            finished = finished | stop.hits(tokens[:, T:], ~finished)
        out = Step(tokens=nxt, finished=finished, eos=hit_eos)
        if config.wants_logprobs:
            logp = raw.float().log_softmax(dim=-1)
            out.logprobs = logp.gather(-1, nxt[:, None]).squeeze(-1)
            if config.top_logprobs:
                out.top_logprobs, out.top_ids = logp.topk(config.top_logprobs, dim=-1)
        yield out
        if bool(finished.all()) or step == n_new - 1:
            return
        if static is not None:
            logits = static.step(nxt, T + step, cache)
            continue
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, 1)), dim=1)
        logits = decode_one_token(model, nxt, cache, attention_mask)
