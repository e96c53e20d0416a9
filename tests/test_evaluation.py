"""qkv.evaluation: windowed perplexity equals a hand-computed cross-entropy; inputs are checked;
the held-out text is the same at every call."""

import math

import pytest
import torch
import torch.nn.functional as F

from qkv.errors import UsageError
from qkv.evaluation import Perplexity, heldout_text, perplexity
from tiny_models import random_ids, tiny_model

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny-llama", vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=64)


def reference(model, ids: torch.Tensor, window: int) -> tuple[float, int]:
    """Summed NLL and count, each window from a fresh forward, with plain cross_entropy in float64."""
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logits = model(chunk[None]).logits[0].double()
        nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return nll, count


@pytest.mark.parametrize("length, window", [(64, 16), (70, 16), (17, 16), (5, 64), (2, 2)])
def test_equals_the_cross_entropy_of_each_window(model, length, window):
    ids = random_ids(VOCAB, 1, length, seed=length, low=0)[0]
    result = perplexity(model, ids, window=window)
    nll, count = reference(model, ids, window)
    assert result.count == count
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_the_partial_window_rule(model):
    """A last window of 1 token scores nothing; one of 2 tokens scores one; full windows score n - 1."""
    ids = random_ids(VOCAB, 1, 34, seed=1, low=0)[0]
    assert perplexity(model, ids[:33], window=16).count == 15 + 15
    assert perplexity(model, ids[:34], window=16).count == 15 + 15 + 1
    assert perplexity(model, ids[:32], window=16).count == 30


def test_windows_do_not_see_each_other(model):
    """Each window starts from an empty context: changing window 1 leaves window 2's NLL alone."""
    ids = random_ids(VOCAB, 1, 32, seed=2, low=0)[0]
    other = ids.clone()
    other[:16] = random_ids(VOCAB, 1, 16, seed=3, low=0)[0]
    second = perplexity(model, ids[16:], window=16).nll_sum
    assert perplexity(model, ids, window=16).nll_sum - perplexity(model, ids[:16], window=16).nll_sum == (
        pytest.approx(second, rel=1e-6)
    )
    assert perplexity(model, other, window=16).nll_sum - perplexity(model, other[:16], window=16).nll_sum == (
        pytest.approx(second, rel=1e-6)
    )


def test_accepts_lists_and_batches_of_one_and_reports_progress(model):
    ids = random_ids(VOCAB, 1, 40, seed=4, low=0)
    seen = []
    result = perplexity(model, ids[0].tolist(), window=16, progress=lambda *a: seen.append(a))
    assert isinstance(result, Perplexity) and result == perplexity(model, ids, window=16)
    assert [(done, total) for done, total, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[-1][2] == pytest.approx(result.ppl)


def test_keeps_the_models_dtype(model):
    bf16 = tiny_model("tiny-llama", vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2).bfloat16()
    ids = random_ids(VOCAB, 1, 24, seed=5, low=0)[0]
    assert perplexity(bf16, ids, window=16).nll_sum == pytest.approx(reference(bf16, ids, 16)[0], rel=1e-5)
    assert next(bf16.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "ids, window, message",
    [
        ([1, 2, 3], 1, r"window=1: a window needs at least 2 tokens"),
        ([1, 2, 3], 128, r"window=128 is longer than the model's context \(64 tokens\)"),
        ([5], 16, r"at least 2 token ids.*got 1"),
        ([], 16, r"at least 2 token ids.*got 0"),
        ([1, VOCAB], 16, rf"token ids must lie in \[0, {VOCAB}\).*from 1 to {VOCAB}"),
        ([-1, 3], 16, r"token ids must lie in \[0, 96\).*from -1 to 3"),
        (torch.zeros(2, 8, dtype=torch.long), 16, r"shape \[T\] or \[1, T\], got torch.int64 \(2, 8\)"),
        (torch.rand(8), 16, r"integer token ids"),
        (torch.tensor(5), 16, r"shape \[T\] or \[1, T\], got torch.int64 \(\)"),
    ],
    ids=["window-1", "too-long", "one-id", "no-ids", "id-too-big", "negative-id", "batch-of-2", "floats", "scalar"],
)
def test_bad_inputs_say_what_is_wrong(model, ids, window, message):
    with pytest.raises(UsageError, match=message):
        perplexity(model, ids, window=window)


def test_heldout_text_is_deterministic_and_long_enough():
    text = heldout_text()
    assert text == heldout_text() and len(text) >= 80_000
    assert "0x" not in text and "site-packages" not in text
    assert text.startswith("Text wrapping and filling.")  # textwrap's docstring opens it
    assert heldout_text(min_chars=1000) == text[: len(heldout_text(min_chars=1000))]  # a prefix of the same text
    with pytest.raises(UsageError, match="fewer than min_chars"):
        heldout_text(min_chars=10**9)


# -- chunked: each window fed through a KV cache, a chunk of tokens per forward -----------------------


@pytest.mark.parametrize("length, window, chunk", [(64, 64, 7), (70, 32, 16), (40, 64, 1), (33, 16, 64)])
def test_chunked_equals_one_forward_per_window(model, length, window, chunk):
    ids = random_ids(VOCAB, 1, length, seed=length + chunk, low=0)[0]
    nll, count = reference(model, ids, window)
    result = perplexity(model, ids, window=window, chunk=chunk)
    assert result.count == count
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("overrides", [{"position": "alibi"}, {"sliding_window": 8}], ids=["alibi", "sliding"])
def test_chunked_equals_one_forward_with_alibi_and_a_sliding_window(overrides):
    other = tiny_model("tiny-llama", vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, **overrides)
    ids = random_ids(VOCAB, 1, 50, seed=6, low=0)[0]
    assert perplexity(other, ids, window=50, chunk=6).nll_sum == pytest.approx(reference(other, ids, 50)[0], rel=1e-5)


def test_chunked_runs_past_the_trained_context_under_rope_scaling():
    """A window longer than max_seq_len is refused until a RoPE scaling stretches the context."""
    from qkv.generation import scale_rope

    long = tiny_model("tiny-llama", vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=32)
    ids = random_ids(VOCAB, 1, 64, seed=7, low=0)[0]
    with pytest.raises(UsageError, match=r"window=64 is longer than the model's context \(32 tokens\)"):
        perplexity(long, ids, window=64, chunk=16)
    scale_rope(long, "linear:2")
    assert perplexity(long, ids, window=64, chunk=16).nll_sum == pytest.approx(reference(long, ids, 64)[0], rel=1e-5)


def test_a_window_past_a_dynamic_ntk_models_trained_length_equals_one_forward():
    dynamic = tiny_model(
        "tiny-llama", vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=32,
        rope_scaling={"type": "dynamic", "factor": 2.0},
    )  # fmt: skip
    with torch.no_grad():  # sharper attention than the 0.02 init's, so that the rotation shows in the loss
        for block in dynamic.blocks:
            block.attn.qkv_proj.weight.mul_(8.0)
    ids = random_ids(VOCAB, 1, 70, seed=8, low=0)[0]
    for window in (32, 70):  # within the trained length (through the cache), past it (one forward)
        nll = perplexity(dynamic, ids, window=window, chunk=8).nll_sum
        assert nll == pytest.approx(reference(dynamic, ids, window)[0], rel=1e-5)


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_a_bad_chunk_is_refused(model, chunk):
    with pytest.raises(UsageError, match=r"chunk=.* must be a positive number of tokens"):
        perplexity(model, [1, 2, 3], window=16, chunk=chunk)
