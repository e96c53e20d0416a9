"""Weight-only quantized linears: the stored form, every compute path against a float64
reference, and model-level quantize/dequantize."""

from __future__ import annotations

import pytest
import torch
from tests.tiny_models import random_ids, tiny_model

import qkv
import qkv.nn.quant as quant
from qkv.nn.linear import Linear
from qkv.nn.quant import QuantLinear, dequantize_model, pack_nibbles, quantize_model, quantize_weight, unpack_nibbles


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ w^T + b in float64, w rebuilt from the stored integers by the documented formula."""
    N, K = layer.out_features, layer.in_features
    group = layer.group_size or K
    qweight = layer.state_dict()["qweight"]  # the stored form, also once the packed form replaced it
    if layer.bits == 4:
        q = torch.stack((qweight & 15, qweight >> 4), -1).view(N, K // group, group).double()
        w = (q - 8) * layer.scales.double()[..., None] + layer.zeros.double()[..., None]
    else:
        w = qweight.view(N, K // group, group).double() * layer.scales.double()[..., None]
    y = x.double() @ w.view(N, K).T
    return y + layer.bias.double() if layer.bias is not None else y


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 32)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)
    assert torch.equal(unpack_nibbles(packed), q)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, None), (8, 32)])
def test_rounding_error_is_at_most_half_a_step(bits, group):
    w = torch.randn(48, 128)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 48, bias=False).requires_grad_(False), bits, group)
    layer.assign(quantize_weight(w, bits, group))
    step = layer.scales.repeat_interleave(group or 128, dim=1)
    assert (layer.dequantize() - w).abs().le(step / 2 + 1e-6).all()
    if bits == 4:  # asymmetric: each group's min and max are exact
        g = w.view(48, -1, group)
        dq = layer.dequantize().view(48, -1, group)
        torch.testing.assert_close(dq.amin(-1), g.amin(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(dq.amax(-1), g.amax(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None), (8, 32)])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 1 and 5: the packed kernels; 40: dequantize + dense matmul
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_float64_reference(bits, group, rows, bias):
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 192, bias=bias)
    layer = QuantLinear.from_linear(dense, bits, group)
    x = torch.randn(rows, 256)
    ref = reference(layer, x.bfloat16().float())
    got = layer(x.bfloat16()).double()
    # bfloat16 activations and (in the kernels) bfloat16 scales: relative error ~2^-8 of |x||w|
    scale = (x.abs() @ layer.dequantize().abs().T).double().amax()
    assert (got - ref).abs().max() <= 2**-6 * scale
    got32 = layer(x).double()  # float32 activations always take the exact dequantize path
    torch.testing.assert_close(got32, reference(layer, x), atol=1e-4, rtol=1e-5)
    assert got.shape == (rows, 192)


def test_kernel_path_is_used_and_matches_dense_path_on_bfloat16(monkeypatch):
    torch.manual_seed(1)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 64, bias=False), 4, 32)
    x = torch.randn(3, 128).bfloat16()
    kernel = layer(x)
    assert layer._kernel is not None  # the packed form was built
    monkeypatch.setattr(quant, "DENSE_ROWS", 1)
    dense = layer(x)
    assert (kernel.float() - dense.float()).abs().max() <= 2**-6 * dense.float().abs().max()


def test_group_wise_int8_through_the_int4_kernel_is_exact_in_float32_scales():
    """q = 16 hi + lo: the doubled int4 product equals the int8 weight up to bfloat16 rounding of
    the activations and scales only (no rounding of the integers)."""
    torch.manual_seed(2)
    layer = QuantLinear(64, 128, bits=8, group_size=32)
    layer.assign({"qweight": torch.randint(-127, 128, (128, 64), dtype=torch.int8),
                  "scales": torch.full((128, 2), 2.0**-7)})  # fmt: skip
    x = torch.randint(-4, 5, (1, 64)).bfloat16()  # small integers: every product exact in bfloat16
    torch.testing.assert_close(layer(x).double(), reference(layer, x.float()), atol=0.5, rtol=2**-8)


def test_leading_dimensions_are_kept():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), 4, 32)
    assert layer(torch.randn(2, 3, 64).bfloat16()).shape == (2, 3, 32)


def test_bad_shapes_and_options():
    with pytest.raises(ValueError, match="bits=3"):
        QuantLinear(64, 32, bits=3)
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        QuantLinear(48, 32, bits=4, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(64, 32, bits=4, group_size=None)
    layer = QuantLinear(64, 32, bits=4)
    with pytest.raises(ValueError, match=r"qweight: got shape \(32, 64\)"):
        layer.assign({"qweight": torch.zeros(32, 64, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize_model(tiny_model("tiny-llama"), "int3")


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantize_model_replaces_every_linear_and_stays_close(scheme):
    model = tiny_model("tiny-llama", d_model=64, d_ff=128)
    ids = random_ids(model.config.vocab_size, 2, 12, seed=0)
    with torch.no_grad():
        before = model(ids).logits
        quantize_model(model, scheme)
        after = model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and not any(type(m) is Linear for m in model.modules())
    assert model.embed.tokens.weight.dtype == torch.float32  # the embedding lookup stays dense
    assert (model.lm_head.bits, model.lm_head.group_size) == (8, 32)  # the head: int8 in groups, either scheme
    body = model.blocks[0].mlp.down
    assert (body.bits, body.group_size) == ((8, None) if scheme == "int8" else (4, 32))
    rel = (after - before).norm() / before.norm()
    assert rel < (0.02 if scheme == "int8" else 0.2), rel
    with torch.no_grad():
        dequantize_model(model)
        again = model(ids).logits
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    torch.testing.assert_close(again, after, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (8, None)])
def test_packed_form_replaces_the_stored_form_and_gives_it_back(bits, group):
    """After the first bfloat16 forward the kernel layout is the only copy in memory; state_dict()
    and dequantize() rebuild the stored form from it, bit for bit."""
    torch.manual_seed(3)
    layer = QuantLinear.from_linear(torch.nn.Linear(96, 128, bias=True), bits, group)
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    dense = layer.dequantize()
    y = layer(torch.randn(1, 96).bfloat16())
    if bits == 4 or group:  # the int4 layout (int8 per channel reads its stored tensor directly)
        assert layer._released and layer.qweight.is_meta
    for key, value in layer.state_dict().items():
        assert torch.equal(value, stored[key]), key
    assert torch.equal(layer.dequantize(), dense)
    fresh = QuantLinear(96, 128, bias=True, bits=bits, group_size=group)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(torch.ones(1, 96).bfloat16()), layer(torch.ones(1, 96).bfloat16()))
    layer.load_state_dict(stored)  # loading into a layer whose stored form was released
    assert not layer._released and torch.equal(layer.qweight, stored["qweight"])
    assert y.shape == (1, 128)


def test_casting_the_model_keeps_scales_float32():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 64), 4, 32)
    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, scales)
    assert layer.bias.dtype == torch.bfloat16


def test_shapes_the_kernel_refuses_take_the_dense_path():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 24), 4, 32)  # 24 rows: not a multiple of 16
    x = torch.randn(1, 64)
    y = layer(x.bfloat16())
    assert layer._kernel == ("dense",) and not layer._released
    torch.testing.assert_close(y.double(), reference(layer, x.bfloat16().float()), atol=0.05, rtol=0.02)


def test_many_row_bfloat16_forward_dequantizes_from_the_packed_form_like_dequantize():
    torch.manual_seed(5)
    layer = QuantLinear.from_linear(torch.nn.Linear(96, 128, bias=True), 4, 32)
    layer(torch.randn(1, 96).bfloat16())  # builds the packed form, releases the stored one
    assert layer._released
    x = torch.randn(40, 96).bfloat16()
    fast = layer._dense_weight(torch.bfloat16)
    slow = layer.dequantize(torch.bfloat16)
    assert torch.equal(fast, slow)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, fast, layer.bias.bfloat16()))


def test_direct_packing_equals_torchs_converter():
    """qkv writes torch's int4 CPU layout itself (the converter's int32 round trip is the slow part
    of loading); it must be byte for byte what torch's converter writes."""
    assert quant._int4_layout_ok()
    for rows in (64, 192):  # one block of 64 rows, and several
        q = torch.randint(0, 16, (rows, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
        packed = quant._int4pack(q)
        assert packed.is_contiguous() and torch.equal(packed, quant._int4pack_torch(q))
        assert torch.equal(quant._int4unpack(packed), q)


@pytest.mark.parametrize(
    ("n", "k", "group"), [(64, 96, 32), (192, 576, 32), (576, 1536, 32), (128, 256, 64), (64, 256, 128)]
)
def test_native_dense_weight_equals_the_torch_fallback_and_dequantize(n, k, group, monkeypatch):
    """The C kernel (qkv/kernels/int4_dense.c) writes the many-row dense weight bit for bit as the
    torch ops it replaces, and as `dequantize`, over several shapes and group sizes."""
    from qkv import kernels

    if kernels.library("int4_dense") is None:
        pytest.skip(f"the native kernel is not built here: {kernels.unavailable('int4_dense')}")
    torch.manual_seed(n + k + group)
    layer = QuantLinear.from_linear(torch.nn.Linear(k, n), 4, group)
    layer.prepare(torch.bfloat16)
    assert layer._released
    calls = []
    native = quant._int4_dense_native
    monkeypatch.setattr(quant, "_int4_dense_native", lambda *a: calls.append(1) or native(*a))
    fast = layer._dense_weight(torch.bfloat16)
    assert calls and torch.equal(fast, layer.dequantize(torch.bfloat16))
    monkeypatch.setattr(quant, "_int4_dense_native", lambda *a: False)  # the torch path
    assert torch.equal(layer._dense_weight(torch.bfloat16), fast)


def test_a_tied_head_multiplies_by_its_embedding_table_from_twin_rows_on():
    """prepare_model gives a packed tied head the embedding table as its dense twin: shared (same
    storage, not in the state dict), used from TWIN_ROWS rows on, dropped when the model moves."""
    model = tiny_model("tiny-llama", tie_embeddings=True, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
    model = quant.prepare_model(quantize_model(model, "int4").to(torch.bfloat16))
    head, table = model.lm_head, model.embed.tokens.weight
    assert head._twin and head._twin[0].data_ptr() == table.data_ptr()
    assert not any("twin" in key for key in model.state_dict())
    with torch.no_grad():
        many = torch.randn(quant.TWIN_ROWS, 64).bfloat16()
        assert torch.equal(head(many), torch.nn.functional.linear(many, table))
        few = many[: quant.TWIN_ROWS - 1]
        assert not torch.equal(head(few), torch.nn.functional.linear(few, table))  # the packed kernel
        torch.testing.assert_close(head(few), torch.nn.functional.linear(few, table), atol=0.05, rtol=0.02)
    model.float()
    assert not model.lm_head._twin
    with pytest.raises(ValueError, match=r"a dense twin must be \[512, 64\]"):
        head.share_dense(torch.zeros(64, 512))


def _native_int4_or_skip():
    from qkv.kernels import ops

    if not ops.int4_matmul_available():
        pytest.skip("qkv's int4 kernel is not available here (no C compiler or no AVX-512 BF16)")


@pytest.mark.real
def test_the_q4_1_file_through_qkvs_int4_kernel_scores_like_torchs(monkeypatch):
    """Every row of two 512-token windows through the packed kernels (no dequantizing): qkv's
    int4 kernel and torch's give the same perplexity to 0.3% (measured apart by 0.04% over 8
    windows, ad hoc), so the kernel's float32 group sums cost no quality."""
    from qkv.evaluation import heldout_text, perplexity

    _native_int4_or_skip()
    model = qkv.load("smollm2-135m-instruct")
    ids = model.tokenizer.encode(heldout_text())[: 2 * 512]
    monkeypatch.setattr(quant, "DENSE_ROWS", 1 << 30)
    monkeypatch.setattr(quant, "INT4_MATMUL_ROWS", 1)
    calls = []
    native = quant._native_int4_matmul
    monkeypatch.setattr(quant, "_native_int4_matmul", lambda: calls.append(1) or native())
    ours = perplexity(model, ids, window=512).ppl
    assert calls
    monkeypatch.setattr(quant, "_native_int4_matmul", lambda: False)  # torch's kernel, the doubled head too
    theirs = perplexity(model, ids, window=512).ppl
    assert abs(ours / theirs - 1) < 0.003


@pytest.mark.real
def test_greedy_picks_through_qkvs_kernel_are_torchs_but_for_bfloat16_ties(monkeypatch):
    """Four prompts and their greedy continuations, scored with every product on the packed kernels:
    qkv's int4 kernel picks torch's kernel's token at every position but near-ties (top two logits
    within 2^-6, two bfloat16 steps: there a different float32 summation order may flip the pick)."""
    _native_int4_or_skip()
    model = qkv.load("smollm2-135m-instruct")
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time, a"]
    ids = [model.tokenizer.encode(p) for p in prompts]
    shortest = min(map(len, ids))
    batch = model.generate(torch.tensor([i[:shortest] for i in ids]), max_new_tokens=16, eos_token_id=[], compile=False)
    monkeypatch.setattr(quant, "DENSE_ROWS", 1 << 30)
    picks = {}
    with torch.no_grad():
        for name, rows, native in (("qkv", 1, quant._native_int4_matmul), ("torch", 1 << 30, lambda: False)):
            monkeypatch.setattr(quant, "INT4_MATMUL_ROWS", rows)
            monkeypatch.setattr(quant, "_native_int4_matmul", native)
            picks[name] = model(batch).logits.float()  # [4, T, V]
    top = picks["torch"].topk(2, dim=-1).values
    clear = (top[..., 0] - top[..., 1]) > 2**-6 * top[..., 0].abs()
    assert clear.float().mean() > 0.6  # most picks are clear: the test is not vacuous
    assert torch.equal(picks["qkv"].argmax(-1)[clear], picks["torch"].argmax(-1)[clear])
