"""KV cache (`qkv.cache`) through `DecoderLM`: cached logits equal the uncached forward, token by
token and in chunks, far past a sliding window, for left-padded batches and after `reorder`.
Also the decoder's input errors, which guard the cache's bounds."""

from __future__ import annotations

import pytest
import torch

from qkv.models.decoder import DecoderLM
from tiny_models import left_pad, random_ids, tiny_model

MODELS = {  # name -> (preset, overrides)
    "tiny-gpt2": ("tiny-gpt2", {}),
    "tiny-llama": ("tiny-llama", {}),
    "tiny-mistral": ("tiny-mistral", {}),  # sliding window 16
    "alibi": ("tiny-gpt2", {"position": "alibi"}),
    "alibi-window-eager": ("tiny-llama", {"position": "alibi", "sliding_window": 8, "attn_backend": "eager"}),
}
ATOL = 1e-5
VOCAB = 512  # every tiny preset's


def make_model(name: str) -> DecoderLM:
    preset, overrides = MODELS[name]
    model = tiny_model(preset, **overrides)
    # GPT-2's N(0, 0.02) init makes near-uniform logits that hide mistakes; use unit-scale activations.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=p.shape[-1] ** -0.5)
            else:
                p.normal_(1.0 if p.abs().sum() > 0 else 0.0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> DecoderLM:
    return make_model(request.param)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "chunks", [[1] * 60, [7, 5] + [1] * 48, [20, 17, 1, 1, 21], [60]], ids=["1x60", "7+5+1x48", "20+17+1+1+21", "60"]
)
# The default-thread variants (every model x chunking again, at torch's thread count) run in
# `make test-all`; `make test` checks the bit-exact claims at the default count elsewhere (resume,
# compiled decoding).
@pytest.mark.parametrize(
    "threads", [1, pytest.param("default", marks=pytest.mark.slow)], indirect=True, ids=["1-thread", "default-threads"]
)
@torch.no_grad()
def test_cached_chunks_equal_the_full_forward(model, chunks, threads):
    """60 tokens: with a window of 16 (or 8) the ring wraps several times; chunks may exceed it.
    The bound holds with one thread and with torch's default thread count."""
    ids = random_ids(VOCAB, 2, sum(chunks), seed=1, low=0)
    full = model(ids).logits
    assert full.abs().max() > 1  # logits are not trivially small
    cache = model.new_cache(2)
    start = 0
    for n in chunks:
        out = model(ids[:, start : start + n], cache=cache).logits
        assert max_diff(out, full[:, start : start + n]) <= ATOL, f"chunk at {start}"
        start += n
    assert cache.pos == 60


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(model):
    rows = [random_ids(VOCAB, 1, n, seed=n, low=0)[0] for n in (23, 9, 17)]
    ids, mask = left_pad(rows)
    out = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits
        assert max_diff(out[i, -1], alone[0, -1]) <= ATOL, f"row {i}"


@torch.no_grad()
def test_left_padded_decoding_with_cache_equals_each_row_alone(model):
    """Prefill a padded batch, then 25 one-token steps (past the window): each row as if alone."""
    rows = [random_ids(VOCAB, 1, n, seed=n, low=0)[0] for n in (21, 6, 13)]
    ids, mask = left_pad(rows)
    steps = random_ids(VOCAB, 3, 25, seed=99, low=0)
    cache = model.new_cache(3)
    out = model(ids, attention_mask=mask, position_ids=positions(mask), cache=cache).logits[:, -1]
    batch_logits = [out]
    for t in range(steps.shape[1]):
        mask = torch.cat((mask, torch.ones(3, 1, dtype=torch.long)), dim=1)
        pos = positions(mask)[:, -1:]
        batch_logits.append(
            model(steps[:, t : t + 1], attention_mask=mask, position_ids=pos, cache=cache).logits[:, -1]
        )
    for i, row in enumerate(rows):
        alone = model(torch.cat((row, steps[i]))[None]).logits[0, len(row) - 1 :]
        for t, logits in enumerate(batch_logits):
            assert max_diff(logits[i], alone[t]) <= ATOL, f"row {i} step {t}"


@torch.no_grad()
def test_attentions_with_a_cache(model):
    ids = random_ids(VOCAB, 1, 30, seed=1, low=0)
    cache = model.new_cache(1)
    model(ids[:, :29], cache=cache)
    out = model(ids[:, 29:], cache=cache, output_attentions=True)
    cfg = model.config
    S = cfg.sliding_window + 1 if cfg.sliding_window else 30  # a ring of `window` keys, then the new one
    assert len(out.attentions) == cfg.n_layers
    for weights in out.attentions:
        assert weights.shape == (1, cfg.n_heads, 1, S)
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, cfg.n_heads, 1))
    full = model(ids, output_attentions=True).attentions
    if not cfg.sliding_window:
        torch.testing.assert_close(out.attentions[0][0, :, 0], full[0][0, :, -1], atol=ATOL, rtol=0)
    else:  # the ring holds the window's keys out of order: compare the sorted visible weights
        visible = full[0][0, :, -1, -cfg.sliding_window :]
        torch.testing.assert_close(out.attentions[0][0, :, 0].sort(-1).values[:, 1:], visible.sort(-1).values)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
@torch.no_grad()
def test_cache_overflow_is_a_clear_error(name):
    model = make_model(name)
    cache = model.new_cache(1, max_len=20)
    model(random_ids(VOCAB, 1, 15, seed=1, low=0), cache=cache)
    with pytest.raises(ValueError, match=r"KV cache holds 20 positions but 21 are needed.*max_len"):
        model(random_ids(VOCAB, 1, 6, seed=1, low=0), cache=cache)
    assert cache.pos == 15  # a refused step writes nothing the next step would see
    model(random_ids(VOCAB, 1, 5, seed=1, low=0), cache=cache)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
@torch.no_grad()
def test_reorder_permutes_rows(name):
    model = make_model(name)
    ids = random_ids(VOCAB, 3, 24, seed=1, low=0)
    cache = model.new_cache(3)
    model(ids, cache=cache)
    before = [k.clone() for k in cache.k]
    index = torch.tensor([2, 0, 0])
    cache.reorder(index)
    for k, old in zip(cache.k, before):
        assert torch.equal(k, old[index])
    nxt = random_ids(VOCAB, 3, 1, seed=7, low=0)
    out = model(nxt, cache=cache).logits[:, -1]
    expected = model(torch.cat((ids[index], nxt), dim=1)).logits[:, -1]
    assert max_diff(out, expected) <= ATOL


# -- DecoderLM input errors -------------------------------------------------------------------------


@torch.no_grad()
def test_prompt_longer_than_the_context_is_an_error():
    model = make_model("tiny-gpt2")  # max_seq_len 128
    with pytest.raises(ValueError, match=r"sequence of 129 tokens exceeds the model's context of 128"):
        model(random_ids(VOCAB, 1, 129, seed=1, low=0))
    cache = model.new_cache(1)
    model(random_ids(VOCAB, 1, 100, seed=1, low=0), cache=cache)
    with pytest.raises(ValueError, match=r"sequence of 130 tokens exceeds the model's context of 128"):
        model(random_ids(VOCAB, 1, 30, seed=1, low=0), cache=cache)


@pytest.mark.parametrize("bad", [512, 10_000, -1])
def test_token_id_outside_the_vocabulary_is_an_error(bad):
    model = make_model("tiny-llama")
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, 512\)"):
        model(ids)


@pytest.mark.parametrize(("ids", "message"), [(torch.tensor([1, 2, 3]), r"\[batch, seq_len\]"),
                                               (torch.tensor([[1.0, 2.0]]), "integer tensor")])  # fmt: skip
def test_malformed_input_ids_are_errors(ids, message):
    with pytest.raises(ValueError, match=message):
        make_model("tiny-llama")(ids)


@pytest.mark.parametrize("shape", [(1, 5), (2, 4), (1, 6, 1)])
def test_wrong_attention_mask_shape_is_an_error(shape):
    model = make_model("tiny-llama")
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, past \+ seq_len\] = \(1, 6\)"):
        model(random_ids(VOCAB, 1, 6, seed=1, low=0), attention_mask=torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny-llama", {}),
        ("tiny-gpt2", {}),
        ("tiny-mistral", {"sliding_window": 6}),
        ("tiny-llama", {"position": "alibi"}),
    ],
)
def test_per_row_slots_equal_the_full_forward(preset, overrides):
    """A static cache written at input_pos [B, 1]: each row decodes at its own position (rows
    prefilled to different lengths through `row_view`), and its logits are the full forward's."""
    from qkv import KVCache

    model = tiny_model(preset, **overrides)
    ids = random_ids(512, 3, 20, seed=1, low=0)
    lengths = [5, 9, 12]
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 3, 32, static=True)
        for row, n in enumerate(lengths):
            model(ids[row : row + 1, :n], cache=cache.row_view(row, 16), input_pos=torch.arange(n))
        pos = torch.tensor(lengths)
        rows = torch.arange(3)
        for _ in range(6):
            out = model(ids[rows, pos][:, None], cache=cache, input_pos=pos[:, None]).logits[:, 0]
            assert (out - full[rows, pos]).abs().max().item() <= 1e-5
            pos = pos + 1


def test_row_view_shares_storage_and_checks_its_bounds():
    model = tiny_model("tiny-llama")
    cache = model.new_cache(2, 16, static=True)
    view = cache.row_view(1, 8)
    assert view.batch_size == 1 and view.max_len == 8
    view.k[0].fill_(1.0)
    assert cache.k[0][1, :, :8].eq(1).all() and cache.k[0][0].eq(0).all() and cache.k[0][1, :, 8:].eq(0).all()
    with pytest.raises(ValueError, match="outside the cache's 2 rows x 16 slots"):
        cache.row_view(2)
    with pytest.raises(ValueError, match="static"):
        model.new_cache(1, 8).row_view(0)


def test_per_row_query_slots_need_a_static_mask():
    from qkv.nn.mask import build_attention_mask

    with pytest.raises(ValueError, match="static=True"):
        build_attention_mask(torch.zeros(2, 1, dtype=torch.long), torch.arange(4), causal=True)


@pytest.mark.parametrize("window, new", [(64, 2048), pytest.param(4096, 32768, marks=pytest.mark.slow)])
def test_a_sliding_window_keeps_its_ring_over_a_long_generation(window, new):
    """The cache's buffers keep `window` slots per layer (the same storage, never regrown) however
    long the generation runs, and the last logits still equal a fresh forward over the window.

    One layer, so the last token's output depends on the last `window` tokens only."""
    from qkv.generation.decode import decode_one_token, start_decoding

    model = tiny_model(
        "tiny-mistral", d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, n_layers=1, sliding_window=window,
        max_seq_len=new + 64,
    )  # fmt: skip
    prompt = random_ids(512, 1, 16, seed=0)
    cache, logits, _, _ = start_decoding(model, prompt, new)
    buffers = [(t.data_ptr(), tuple(t.shape)) for t in cache.k + cache.v]
    assert all(shape == (1, 1, window, 16) for _, shape in buffers)
    tokens = [prompt[0]]
    with torch.no_grad():
        for _ in range(new - 1):
            token = logits.argmax(-1)
            tokens.append(token)
            logits = decode_one_token(model, token, cache)
        assert [(t.data_ptr(), tuple(t.shape)) for t in cache.k + cache.v] == buffers
        total = 16 + new - 1
        assert cache.pos == total and sorted(cache.ring_slots.tolist()) == list(range(total - window, total))
        ids = torch.cat(tokens)[-window:][None]
        ref = model(ids, position_ids=torch.arange(total - window, total)[None]).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
