"""`generate`: token ids in, token ids out, through whichever decoding path the options choose.

Greedy and sampled decoding run `decode_steps`; `num_beams > 1` runs `beam_search`. Both take the
same `GenerationConfig`, the same context rule (`context_budget`), the same EOS resolution and the
same stop-string matcher, so an option means the same thing on every path, and an option a path
cannot honour is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from qkv.errors import GenerationOptionError
from qkv.generation.beam import beam_search
from qkv.generation.decode import decode_steps, generation_budget, is_encoder_decoder, resolve_eos
from qkv.generation.options import GenerationConfig
from qkv.generation.processors import LogitsProcessor
from qkv.generation.stopping import StopStrings


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int | None = None,
    *,
    config: GenerationConfig | None = None,
    attention_mask: torch.Tensor | None = None,
    processors: list[LogitsProcessor] | None = None,
    compile: bool | None = None,
    **options: Any,
) -> torch.Tensor:
    """Generate after input_ids [B, T] -> [B * num_return_sequences, T + n] (for an encoder-decoder,
    input_ids is the source and the result is the decoder's [start token + n]).

    Options come as a `GenerationConfig` and/or keywords that override its fields (see
    `GenerationConfig` for each): temperature=0 is greedy, otherwise tokens are sampled after the
    processors; num_beams > 1 runs beam search. Rows that emitted an EOS id (default: the model
    config's) or whose text completed a stop string (decoded with `model.tokenizer`) are padded
    with pad_token_id (default: the first EOS id) until every row has finished. The prompt plus
    the new tokens must fit the model's context (`context_budget`). Left-padded batches pass
    attention_mask [B, T]; each row then equals generating it alone. `processors` replaces the
    logits processors the options would build. `compile=True` decodes through one compiled
    static-shape step (no left padding; the first call of each shape compiles, ~30 s on 2 cores,
    cached on disk); None, the default, compiles packed quantized decoders (`auto_compile`) and
    decodes everything else eagerly, as beam search and left-padded batches always do.
    """
    config = GenerationConfig.build(config, max_new_tokens=max_new_tokens, **options)
    if config.wants_logprobs:
        raise GenerationOptionError(
            "generate() returns token ids only; ask complete()/stream_completion() for logprobs"
        )
    n_new = generation_budget(model, input_ids.shape[1], config.max_new_tokens)
    eos = resolve_eos(config, model)
    stop = StopStrings(getattr(model, "tokenizer", None), config.stop) if config.stop else None
    if config.num_beams > 1:
        if compile:
            raise GenerationOptionError("compile=True applies to greedy and sampled decoding, not to beam search")
        if processors is not None:
            raise GenerationOptionError("custom processors apply to greedy and sampled decoding, not to beam search")
        return beam_search(model, input_ids, config, n_new, eos, attention_mask, stop)
    if config.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
    steps = decode_steps(model, input_ids, config, n_new, eos, attention_mask, processors, stop, compile)
    new = [step.tokens for step in steps]
    prefix = model.decoder_start_ids(input_ids.shape[0]) if is_encoder_decoder(model) else input_ids
    return torch.cat((prefix, torch.stack(new, dim=1)), dim=1)
