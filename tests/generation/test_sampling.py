"""Sampling: seeded draws are reproducible and follow the processed softmax distribution."""

from __future__ import annotations

import pytest
import torch

from qkv import DecoderLM, ModelConfig
from qkv.generation import GenerationConfig, build_processors, generate, sample_next_token

# Upper 0.001 quantiles of the chi-square distribution by degrees of freedom (any statistics
# table, e.g. NIST/SEMATECH e-Handbook §1.3.6.7.4): a correct sampler fails 1 run in 1000, and
# with fixed seeds a passing run always passes.
CHI2_CRITICAL_P001 = {7: 24.322}
DRAWS = 20_000
LOGITS = torch.tensor([1.5, -0.3, 0.8, 0.0, 2.1, -1.0, 0.4, 1.1])  # 8 tokens


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of the observed token counts against the expected probabilities."""
    observed = torch.bincount(tokens.flatten(), minlength=len(probs)).double()
    expected = probs.double() * tokens.numel()
    assert bool((expected >= 5).all())  # the approximation's usual condition
    return float(((observed - expected) ** 2 / expected).sum())


def draw(logits: torch.Tensor, n: int, seed: int, **options) -> torch.Tensor:
    """n tokens drawn from one row of logits [V] after the processors for `options`."""
    rows = logits.expand(n, -1)
    for proc in build_processors(GenerationConfig(**options)):
        rows = proc(rows, torch.empty(n, 0, dtype=torch.long))
    return sample_next_token(rows, torch.Generator().manual_seed(seed))


def test_sampling_is_reproducible_with_a_seed():
    a, b, c = draw(LOGITS, 500, 1), draw(LOGITS, 500, 1), draw(LOGITS, 500, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sample_next_token(LOGITS[None], greedy=True), LOGITS.argmax()[None])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    tokens = draw(LOGITS, DRAWS, seed=0, temperature=temperature)
    assert chi_square(tokens, (LOGITS / temperature).softmax(-1)) < CHI2_CRITICAL_P001[7]


def test_chi_square_tells_temperatures_apart():
    # The check above has power: draws at temperature 0.5 fail against the temperature-1 softmax.
    tokens = draw(LOGITS, DRAWS, seed=0, temperature=0.5)
    assert chi_square(tokens, LOGITS.softmax(-1)) > 10 * CHI2_CRITICAL_P001[7]


@pytest.fixture(scope="module")
def model8():
    """A tiny decoder over 8 tokens whose next-token distribution is far from uniform."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2", vocab_size=8, max_seq_len=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_generate_samples_the_model_distribution(model8, temperature):
    prompt = torch.tensor([[1, 5, 2]])
    with torch.no_grad():
        logits = model8(prompt).logits[0, -1]
    probs = (logits / temperature).softmax(-1)
    out = generate(model8, prompt, max_new_tokens=1, temperature=temperature, num_return_sequences=DRAWS,
                   seed=0, eos_token_id=[])  # fmt: skip
    assert chi_square(out[:, -1], probs) < CHI2_CRITICAL_P001[7]


def test_top_k_sampling_never_leaves_the_top_k():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    allowed = set(logits.topk(5).indices.tolist())
    tokens = draw(logits, DRAWS, seed=0, temperature=3.0, top_k=5)  # a flat distribution
    assert set(tokens.tolist()) == allowed


def test_top_k_in_generate(model8):
    prompt = torch.tensor([[3, 3, 7]])
    with torch.no_grad():
        allowed = set(model8(prompt).logits[0, -1].topk(3).indices.tolist())
    out = generate(model8, prompt, max_new_tokens=1, temperature=5.0, top_k=3, num_return_sequences=2000,
                   seed=1, eos_token_id=[])  # fmt: skip
    assert set(out[:, -1].tolist()) == allowed


def test_num_return_sequences_rows_are_valid(model8):
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    eos, pad, n = 0, 7, 3
    out = generate(model8, prompts, max_new_tokens=10, temperature=1.0, num_return_sequences=n, seed=0,
                   eos_token_id=eos, pad_token_id=pad)  # fmt: skip
    assert out.shape[0] == len(prompts) * n and out.shape[1] <= 3 + 10
    for i, row in enumerate(out.tolist()):
        assert row[:3] == prompts[i // n].tolist()  # rows of one prompt are consecutive
        new = row[3:]
        assert all(0 <= t < 8 for t in new)
        if eos in new:  # after EOS, only padding
            assert set(new[new.index(eos) + 1 :]) <= {pad}
    assert len({tuple(r) for r in out.tolist()}) > len(prompts)  # the samples differ
    again = generate(model8, prompts, max_new_tokens=10, temperature=1.0, num_return_sequences=n, seed=0,
                     eos_token_id=eos, pad_token_id=pad)  # fmt: skip
    assert torch.equal(out, again)
