"""Beam search over the KV-cached decode step, with the semantics of HF `transformers` 5.x.

Each prompt keeps `num_beams` running hypotheses, scored by the sum of their token log-probs.
Every step looks at the best `2 * num_beams` continuations of all beams of a prompt (more with
several EOS ids, so `num_beams` unfinished ones always remain): among them, those ending in EOS
*and* ranking in the top `num_beams` become finished hypotheses, scored
`sum_logprobs / generated_len ** length_penalty`; the best unfinished ones keep running, and the
cache rows are reordered to follow them (`KVCache.reorder`, never recomputed). At the last step
(max_new_tokens or the model's context) the top `num_beams` continuations are all finished.
The penalties (repetition, frequency/presence) apply to the log-probs before scoring, as HF applies
its processors; with temperature > 0 the sampling filters do too, and the candidates are drawn
from the scores instead of taken from the top (HF's beam sampling). A candidate that completes a
stop string ends like one that emits EOS (it keeps the token that completed it).

A prompt stops being searched when
- `early_stopping=True`: it has `num_beams` finished hypotheses;
- `early_stopping=False`: it has `num_beams` finished and the best running beam, scored at the
  current length, cannot beat the worst of them (HF's heuristic; with `length_penalty > 0` a longer
  beam could in principle still win);
- `early_stopping="never"`: as False, but with `length_penalty > 0` the running beam is scored at
  the maximum length, which is exact (Wu et al. 2016's "canonical" beam search with
  `length_penalty=0`).

The result holds the best `num_return_sequences` finished hypotheses of each prompt, best first,
cut to the longest of them; shorter ones are padded with `pad_token_id`.

Intentional differences from HF:
- HF pads short hypotheses with the first EOS id when `pad_token_id` is 0 (a truthiness slip in
  `output_fill_value`); here `pad_token_id` is used whenever it is given.
- The prompt is prefilled once per prompt, not once per beam, then copied to the beam rows.
- Masked scores are -inf instead of -1e9; this changes no returned hypothesis.
"""

from __future__ import annotations

import torch

from qkv.generation.decode import decode_one_token, pad_id, sampling_setup, start_decoding
from qkv.generation.options import GenerationConfig
from qkv.generation.stopping import StopStrings


def ban_repeated_ngrams(logits: torch.Tensor, input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """No-repeat n-gram rule (Paulus et al. 2018; fairseq/HF `no_repeat_ngram_size`): a token that
    would complete an n-gram already present in input_ids [B, T] gets -inf in logits [B, V]."""
    T = input_ids.shape[1]
    if n <= 0 or n > T:
        return logits
    prefix = input_ids[:, T - n + 1 :]  # (B, n-1): the n-gram the next token would complete
    windows = input_ids.unfold(1, n, 1)  # (B, T-n+1, n)
    matches = (windows[..., :-1] == prefix[:, None]).all(-1)  # (B, T-n+1)
    banned = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.bool, device=logits.device)
    # Non-matching windows scatter into a spare column past the vocabulary.
    banned.scatter_(1, torch.where(matches, windows[..., -1], logits.shape[1]), True)
    return logits.masked_fill(banned[:, :-1], float("-inf"))


@torch.no_grad()
def beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    n_new: int,
    eos: tuple[int, ...] = (),
    attention_mask: torch.Tensor | None = None,
    stop: StopStrings | None = None,
) -> torch.Tensor:
    """Beam search after input_ids [B, T] -> [B * num_return_sequences, T + n], best first per prompt.

    config: num_beams, length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences;
    its penalties apply to the log-probs (as HF applies its processors), and temperature > 0 samples
    the candidates (HF's beam sampling) from a generator seeded with config.seed. n_new: tokens to
    generate (see `context_budget`). A candidate ending in an EOS id or completing a stop string
    (`stop`) is a finished hypothesis. Hypotheses shorter than the longest returned one are padded
    with config.pad_token_id (default: the first EOS id, else 0). Left-padded batches pass
    attention_mask [B, T]. See the module docstring for scoring and stopping.
    """
    config.check_supported("beam")
    num_beams = config.num_beams
    B = input_ids.shape[0]
    device = input_ids.device
    # logits (B, V) after the prefix (B, T): the prompt, or an encoder-decoder's start token
    cache, logits, prefix, attention_mask = start_decoding(
        model, input_ids, n_new, attention_mask, config.prefill_chunk
    )
    T = prefix.shape[1]
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    pad = pad_id(config, eos)
    processors, generator = sampling_setup(config, T, device)
    L = T + n_new
    K = max(2, 1 + len(eos)) * num_beams  # candidates per step: enough to leave num_beams unfinished
    neg_inf = float("-inf")

    # Running beams: tokens (B, nb, L), cumulative log-probs (B, nb). Only beam 0 starts "alive", so
    # the first step does not pick the same continuation num_beams times.
    running = torch.full((B, num_beams, L), pad, dtype=torch.long, device=device)
    running[:, :, :T] = prefix[:, None]
    running_scores = torch.full((B, num_beams), neg_inf, device=device)
    running_scores[:, 0] = 0.0
    # Finished hypotheses, best first: tokens, length-penalised scores, generated lengths.
    finished = running.clone()
    finished_scores = torch.full((B, num_beams), neg_inf, device=device)
    finished_len = torch.zeros((B, num_beams), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # prompts whose finished set is final
    top_beams = torch.arange(K, device=device) < num_beams  # only these candidates may finish
    batch_offset = torch.arange(B, device=device)[:, None] * num_beams

    # Copy each prompt's cache to its beams: row b * num_beams + j is beam j of prompt b.
    to_beams = torch.arange(B, device=device).repeat_interleave(num_beams)
    cache.reorder(to_beams)
    logits = logits[to_beams]  # (B * nb, V)
    if attention_mask is not None:
        attention_mask = attention_mask[to_beams]

    for step in range(n_new):
        cur = T + step  # tokens so far
        seqs = running[:, :, :cur].flatten(0, 1)  # (B * nb, cur)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B * nb, V)
        if config.no_repeat_ngram_size:
            log_probs = ban_repeated_ngrams(log_probs, seqs, config.no_repeat_ngram_size)
        for proc in processors:
            log_probs = proc(log_probs, seqs)
        V = log_probs.shape[-1]
        scores = (log_probs.view(B, num_beams, V) + running_scores[:, :, None]).view(B, num_beams * V)
        if config.greedy:
            cand_scores, cand_idx = scores.topk(K, dim=-1)  # (B, K), best first
        else:  # beam sampling: draw the candidates, then rank them by score
            cand_idx = torch.multinomial(scores.softmax(dim=-1), K, generator=generator)
            cand_scores, order = scores.gather(1, cand_idx).sort(dim=-1, descending=True)
            cand_idx = cand_idx.gather(1, order)
        cand_beam, cand_token = cand_idx // V, cand_idx % V
        cand = running.gather(1, cand_beam[:, :, None].expand(B, K, L)).clone()  # (B, K, L)
        cand[:, :, cur] = cand_token
        last_step = step == n_new - 1
        ends = torch.ones_like(cand_token, dtype=torch.bool) if last_step else torch.isin(cand_token, eos_t)
        if stop is not None and not last_step:
            check = (~ends & ~done[:, None]).flatten()
            ends = ends | stop.hits(cand[:, :, T : cur + 1].flatten(0, 1), check).view(B, K)

        # The best num_beams candidates that did not end keep running.
        keep = cand_scores.masked_fill(ends, neg_inf).topk(num_beams, dim=-1).indices  # (B, nb)
        running = cand.gather(1, keep[:, :, None].expand(B, num_beams, L))
        running_scores = cand_scores.masked_fill(ends, neg_inf).gather(1, keep)

        # Candidates that ended within the top num_beams join the finished set if they beat it.
        new = ends & top_beams & ~done[:, None]
        new_scores = (cand_scores / (step + 1) ** config.length_penalty).masked_fill(~new, neg_inf)
        merged_scores = torch.cat((finished_scores, new_scores), dim=1)
        best = merged_scores.topk(num_beams, dim=-1).indices
        finished_scores = merged_scores.gather(1, best)
        finished = torch.cat((finished, cand), dim=1).gather(1, best[:, :, None].expand(B, num_beams, L))
        new_len = torch.full_like(cand_token, step + 1)
        finished_len = torch.cat((finished_len, new_len), dim=1).gather(1, best)

        if last_step:
            break
        # Can a running beam still beat the worst finished hypothesis? (HF's heuristic, see docstring)
        full = finished_scores[:, -1] > neg_inf
        length = n_new if config.early_stopping == "never" and config.length_penalty > 0 else step + 1
        hopeless = full & (running_scores[:, 0] / length**config.length_penalty <= finished_scores[:, -1])
        done |= hopeless | (full & (config.early_stopping is True))
        if bool(done.all()):
            break
        cache.reorder((batch_offset + cand_beam.gather(1, keep)).flatten())
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B * num_beams, 1)), dim=1)
        logits = decode_one_token(model, running[:, :, cur].flatten(), cache, attention_mask)

    n_ret = config.num_return_sequences
    best_len = int(finished_len[:, :n_ret].max())
    return finished[:, :n_ret, : T + best_len].flatten(0, 1)
