"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

import copy
import math

import pytest
import torch

import qkv
from qkv.training.optim import WarmupCosine, build_optimizer, fused_supported, split_decay


def reference_lr(step: int, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The schedule written out case by case, independently of the implementation."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    cosine = math.cos(math.pi * (step - warmup) / (total - warmup))
    return min_lr + (max_lr - min_lr) * (1 + cosine) / 2


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_schedule_matches_the_formula(warmup):
    schedule = WarmupCosine(max_lr=3e-4, min_lr=3e-5, warmup_steps=warmup, total_steps=50)
    for step in range(60):
        assert schedule(step) == pytest.approx(reference_lr(step, 3e-4, 3e-5, warmup, 50), rel=1e-12)


def test_schedule_landmarks():
    s = WarmupCosine(max_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert s(0) == 0.25  # warmup starts above zero: the first update already moves
    assert s(3) == 1.0  # the last warmup step reaches the peak
    assert s(4) == 1.0  # the cosine starts at the peak
    assert s(9) == pytest.approx(0.55)  # halfway down
    assert s(14) == s(100) == 0.1  # flat after the end


def test_weight_decay_only_on_matrices():
    model = qkv.DecoderLM(qkv.ModelConfig.from_name("tiny-gpt2"))  # learned positions, biases, tied head
    decay, no_decay = split_decay(model)
    assert set(decay) == {
        f"blocks.{i}.{name}.weight" for i in range(2) for name in ("attn.qkv_proj", "attn.o_proj", "mlp.up", "mlp.down")
    }
    assert {"embed.tokens.weight", "embed.positions.weight", "norm.weight", "norm.bias"} <= set(no_decay)
    assert {"blocks.0.attn_norm.weight", "blocks.0.mlp_norm.bias", "blocks.1.attn.qkv_proj.bias"} <= set(no_decay)
    assert "lm_head.weight" not in decay + no_decay  # tied: the embedding, listed once, not decayed


def test_untied_head_is_decayed_and_groups_cover_every_parameter_once():
    model = qkv.DecoderLM(qkv.ModelConfig.from_name("tiny-llama"))  # RMSNorm, no biases, untied head
    decay, no_decay = split_decay(model)
    assert "lm_head.weight" in decay
    assert set(no_decay) == {"embed.tokens.weight", "norm.weight"} | {
        f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "mlp_norm")
    }
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def _train_steps(model, optimizer, steps: int = 4) -> None:
    """Apply `steps` AdamW updates with the same pseudo-random gradients every time it is called."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_fused_update_is_chosen_on_cpu_and_equals_the_foreach_update():
    torch.manual_seed(0)
    fused_model = qkv.DecoderLM(qkv.ModelConfig.from_name("tiny-gpt2"))
    foreach_model = copy.deepcopy(fused_model)
    initial = copy.deepcopy(fused_model.state_dict())
    fused = build_optimizer(fused_model, lr=1e-2, weight_decay=0.1)
    foreach = build_optimizer(foreach_model, lr=1e-2, weight_decay=0.1, fused=False)
    assert fused.defaults["fused"] is True and not foreach.defaults["fused"]
    _train_steps(fused_model, fused)
    _train_steps(foreach_model, foreach)
    for (name, a), b in zip(fused_model.named_parameters(), foreach_model.parameters()):
        assert not torch.equal(a, initial[name]), name  # the update moved it
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # The fused optimizer's state loads into a foreach one and the other way round (resume across versions).
    foreach.load_state_dict(fused.state_dict())
    _train_steps(foreach_model, foreach, steps=1)


def test_fused_supported_only_for_plain_floating_tensors_on_kernel_devices():
    assert fused_supported([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.bfloat16)])
    assert not fused_supported([torch.zeros(2, device="meta")])
    assert not fused_supported([torch.zeros(2, dtype=torch.long)])
    assert not fused_supported([])
