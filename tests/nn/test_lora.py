"""LoRA layers: PEFT's init, target patterns, one low-rank pair per fused slice, dropout on the adapter's
input only, frozen bases (dense and packed int4: QLoRA), merging. The PEFT file format and the
comparison with the `peft` package itself are in tests/checkpoints/test_peft.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.tiny_models import random_ids, tiny_model

from qkv import EncoderDecoder, ModelConfig
from qkv.errors import UsageError
from qkv.nn.linear import Linear
from qkv.nn.lora import (
    LoraConfig,
    LoraLinear,
    LoraSlice,
    apply_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
)
from qkv.nn.quant import QuantLinear, prepare_model, quantize_model, quantized_modules


def _randomize(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"rank": -2}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number, got 0"),
        ({"alpha": -1.0}, "alpha must be a positive number"),
        ({"alpha": math.nan}, "alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"targets": ()}, "targets must be non-empty"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(UsageError, match=message):
        LoraConfig(**kwargs)


def test_config_scaling_and_single_target():
    assert LoraConfig(rank=8, alpha=16).scaling == 2.0
    assert LoraConfig(rank=16, alpha=8, rslora=True).scaling == 2.0  # alpha / sqrt(r)
    assert LoraConfig(targets="o").targets == ("o",)


def test_init_is_peft_s_kaiming_uniform_a_and_zero_b():
    """Each slice's A is drawn as PEFT draws one [r, in] A (kaiming-uniform, a = sqrt(5)); B is zero."""
    base = Linear(40, 24)
    slices = (LoraSlice("q", 0, 8), LoraSlice("k", 8, 8), LoraSlice("v", 16, 8))
    torch.manual_seed(3)
    layer = LoraLinear(base, slices, LoraConfig(rank=4), parts=("q", "k", "v"))
    torch.manual_seed(3)
    expected = [torch.nn.init.kaiming_uniform_(torch.empty(4, 40), a=math.sqrt(5)) for _ in slices]
    assert torch.equal(layer.lora_A.detach(), torch.cat(expected))
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
    assert layer.lora_B.shape == (24, 4) and not layer.lora_B.any()
    assert layer.lora_A.dtype == torch.float32


def test_fresh_adapter_changes_nothing_and_only_lora_trains():
    model = tiny_model("tiny-llama")
    ids = random_ids(512, 2, 12, seed=0)
    with torch.no_grad():
        before = model(ids).logits
    names = apply_lora(model, LoraConfig(rank=4))
    assert names[:4] == ["blocks.0.attn.qkv_proj.q", "blocks.0.attn.qkv_proj.k", "blocks.0.attn.qkv_proj.v",
                         "blocks.0.attn.o_proj"]  # fmt: skip
    assert len(names) == 4 * model.config.n_layers
    assert not any(m.training for m in model.modules())  # wrappers join an eval-mode model in eval mode
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    layer = model.blocks[0].attn.qkv_proj
    cfg = model.config
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    assert layer.lora_A.shape == (3 * 4, cfg.d_model) and layer.lora_B.shape == (q + 2 * kv, 4)


def test_a_layer_computes_its_base_plus_the_scaled_update_of_each_slice():
    """y = x W^T + b + scaling * [B_q A_q x ; 0 (k) ; B_v A_v x], checked against the merged weight."""
    model = tiny_model("tiny-llama")
    apply_lora(model, LoraConfig(rank=3, alpha=5.0, targets=("q", "v")))
    _randomize(model)
    layer = model.blocks[1].attn.qkv_proj
    assert [s.name for s in layer.slices] == ["q", "v"]
    cfg = model.config
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    A_q, B_q = layer.lora_A[:3], layer.lora_B[:q]
    A_v, B_v = layer.lora_A[3:], layer.lora_B[q:]
    delta = torch.zeros(q + 2 * kv, cfg.d_model)
    delta[:q] = B_q @ A_q * (5.0 / 3)
    delta[q + kv :] = B_v @ A_v * (5.0 / 3)
    torch.testing.assert_close(layer.delta_weight(), delta.detach())
    x = torch.randn(2, 5, cfg.d_model)
    with torch.no_grad():
        expected = F.linear(x, layer.base.weight + delta, layer.base.bias)
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[..., q : q + kv], layer.base(x)[..., q : q + kv])  # the k rows are the base's


@pytest.mark.parametrize(
    ("targets", "wrapped"),
    [
        (("o_proj",), ["blocks.0.attn.o_proj", "blocks.1.attn.o_proj"]),  # a module name's dotted suffix
        (("blocks.1.*",), ["blocks.1.attn.qkv_proj.q", "blocks.1.attn.qkv_proj.k", "blocks.1.attn.qkv_proj.v",
                           "blocks.1.attn.o_proj", "blocks.1.mlp.up.gate", "blocks.1.mlp.up.up",
                           "blocks.1.mlp.down"]),  # a glob
        (("gate", "down"), ["blocks.0.mlp.up.gate", "blocks.0.mlp.down", "blocks.1.mlp.up.gate", "blocks.1.mlp.down"]),
        (("blocks.0.attn.qkv_proj",), ["blocks.0.attn.qkv_proj.q", "blocks.0.attn.qkv_proj.k",
                                       "blocks.0.attn.qkv_proj.v"]),  # every slice of one module
        (("*.qkv_proj.k",), ["blocks.0.attn.qkv_proj.k", "blocks.1.attn.qkv_proj.k"]),  # a slice's own name
        (("lm_head",), ["lm_head"]),
        (("up",), ["blocks.0.mlp.up.up", "blocks.1.mlp.up.up"]),  # the up half of the gated layer, not the gate
        (("mlp.up",), ["blocks.0.mlp.up.gate", "blocks.0.mlp.up.up", "blocks.1.mlp.up.gate", "blocks.1.mlp.up.up"]),
    ],
)  # fmt: skip
def test_targets_by_role_module_name_and_glob(targets, wrapped):
    assert apply_lora(tiny_model("tiny-llama"), LoraConfig(targets=targets)) == wrapped


def test_a_plain_mlp_s_up_is_one_layer():
    assert apply_lora(tiny_model("tiny-gpt2"), LoraConfig(targets=("up",))) == ["blocks.0.mlp.up", "blocks.1.mlp.up"]


def test_a_pattern_that_matches_nothing_is_named_with_real_names():
    model = tiny_model("tiny-llama")
    with pytest.raises(UsageError, match=r"LoRA target 'q_proj' matches no linear layer.*blocks\.0\.attn\.qkv_proj\.q"):
        apply_lora(model, LoraConfig(targets=("q", "q_proj")))
    assert not lora_layers(model)  # nothing was wrapped


def test_applying_twice_is_refused():
    model = tiny_model("tiny-llama")
    apply_lora(model, LoraConfig())
    with pytest.raises(UsageError, match="already has LoRA layers"):
        apply_lora(model, LoraConfig(targets=("down",)))


def test_dropout_acts_on_the_adapter_input_only_with_a_mask_per_slice():
    torch.manual_seed(0)
    layer = LoraLinear(Linear(32, 16), (LoraSlice("k", 0, 8), LoraSlice("v", 8, 8)), LoraConfig(rank=2, dropout=0.5),
                       parts=("k", "v"))  # fmt: skip
    x = torch.randn(4, 32)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))  # B = 0: the base sees the whole x, dropout or not
        layer.lora_A[2:] = layer.lora_A[:2]  # the same A and B for both slices:
        layer.lora_B.copy_(torch.randn(16, 2))
        layer.lora_B[8:] = layer.lora_B[:8]
        update = layer(x) - layer.base(x)
        assert not torch.allclose(update[:, :8], update[:, 8:])  # ... so only the masks differ
        layer.eval()
        torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias))


def test_merge_folds_the_update_and_leaves_a_plain_model():
    model = tiny_model("tiny-llama")
    keys = set(model.state_dict())
    apply_lora(model, LoraConfig(rank=4, targets=("q", "k", "v", "o", "gate", "up", "down")))
    _randomize(model)
    ids = random_ids(512, 2, 10, seed=1)
    with torch.no_grad():
        unmerged = model(ids).logits
    assert merge_lora(model) is model
    assert set(model.state_dict()) == keys
    assert all(type(m) is Linear for m in (model.blocks[0].attn.qkv_proj, model.blocks[1].mlp.down))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-4, rtol=0)


def test_seq2seq_cross_attention_takes_q_and_k_v_slices():
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig.from_name("tiny-bart")).eval()
    names = apply_lora(model, LoraConfig(rank=2))
    assert "decoder.blocks.0.cross_attn.q_proj" in names and "decoder.blocks.0.cross_attn.kv_proj.v" in names
    _randomize(model)
    src, tgt = random_ids(512, 2, 9, seed=2), random_ids(512, 2, 5, seed=3)
    with torch.no_grad():
        unmerged = model(src, decoder_input_ids=tgt).logits
        merged = merge_lora(model)(src, decoder_input_ids=tgt).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)


# -- QLoRA: frozen int4 bases -------------------------------------------------------------------


def _int4_model() -> torch.nn.Module:
    model = quantize_model(tiny_model("tiny-llama"), "int4")
    assert quantized_modules(model)["blocks.0.attn.qkv_proj"] == {"bits": 4, "group_size": 32}
    return model


def _packed_state(model) -> dict[str, torch.Tensor]:
    return {
        name: t.clone() for name, t in model.state_dict().items() if not name.rpartition(".")[2].startswith("lora_")
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: the packed kernels' forward
def test_quantized_base_input_gradient_is_the_dequantized_weight_s_and_no_dense_weight_is_kept(dtype):
    model = prepare_model(_int4_model().to(dtype))  # bfloat16: the packed kernel form, stored qweight released
    apply_lora(model, LoraConfig(rank=2, targets=("blocks.0.attn.qkv_proj",)))
    assert all(p.device.type == "cpu" for p in lora_parameters(model))
    layer = model.blocks[0].attn.qkv_proj
    assert isinstance(layer.base, QuantLinear)
    x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, layer.out_features, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert max(saved) < layer.out_features * layer.in_features  # autograd through F.linear would keep W (as W^T)
    y.backward(grad_out)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    w = layer.base.dequantize(torch.float32)
    torch.testing.assert_close(x.grad.float(), grad_out.float() @ w, atol=tol, rtol=tol)
    torch.testing.assert_close(y.float(), x.detach().float() @ w.T, atol=tol, rtol=tol)  # B = 0: the base alone


def test_qlora_trains_the_adapter_and_leaves_the_packed_base_bit_for_bit():
    model = _int4_model()
    targets = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")  # the head: a group-wise int8 QuantLinear
    apply_lora(model, LoraConfig(rank=8, alpha=16.0, targets=targets))
    before = _packed_state(model)
    model.train()
    ids = random_ids(512, 2, 16, seed=4)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # B starts at zero, so only B has a gradient at first; layer 0's passes through layer 1's base
            first = model.blocks[0].attn.qkv_proj
            assert first.lora_B.grad.abs().sum() > 0 and model.blocks[0].mlp.up.lora_B.grad.abs().sum() > 0
            assert not first.lora_A.grad.any()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses  # overfits one batch: ~6.3 -> ~0.3
    assert model.blocks[0].attn.qkv_proj.lora_A.grad.abs().sum() > 0
    after = _packed_state(model)
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    # merging gives dense layers (the update is not on the int4 grid) with the adapter's outputs
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = merge_lora(model)(ids).logits
    assert type(model.blocks[0].attn.qkv_proj) is Linear and not quantized_modules(model)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
