"""The static-shape decode step (a static `KVCache` written at `input_pos`) and `generate(compile=True)`."""

from __future__ import annotations

import pytest
import torch

from qkv import KVCache
from qkv.generation.static_step import StaticStep, static_cache_len
from tiny_models import tiny_model


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny-gpt2", {}),
        ("tiny-llama", {}),
        ("tiny-mistral", {"sliding_window": 6}),
        ("tiny-llama", {"position": "alibi"}),
    ],
)
def test_static_step_equals_forward(preset, overrides):
    model = tiny_model(preset, **overrides)
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 2, 64, static=True)
        parts = [model(ids[:, :9], cache=cache, input_pos=torch.arange(9)).logits]
        parts += [model(ids[:, i : i + 1], cache=cache, input_pos=torch.tensor([i])).logits for i in range(9, 30)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_eager_static_step_runner_equals_forward():
    model = tiny_model("tiny-llama")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    runner = StaticStep(model)
    with torch.no_grad():
        full = model(ids).logits
        cache = runner.new_cache(1, 12)
        assert cache.static and cache.max_len == 256
        got = [runner.prefill(ids[:, :5], cache)] + [runner.step(ids[:, i], i, cache) for i in range(5, 12)]
    assert (torch.stack(got, dim=1) - full[:, 4:]).abs().max().item() <= 1e-5


def test_static_cache_needs_input_pos():
    model = tiny_model("tiny-gpt2")
    with pytest.raises(ValueError, match="input_pos"):
        model(torch.tensor([[1, 2]]), cache=model.new_cache(1, 8, static=True))


def test_static_cache_len_rounds_up_within_the_context():
    assert static_cache_len(166, 8192) == 256
    assert static_cache_len(300, 8192) == 512
    assert static_cache_len(300, 400) == 400
    assert static_cache_len(10, None) == 256


@pytest.mark.parametrize("threads", [1, "default"], indirect=True)
def test_compiled_generate_equals_eager(threads):
    model = tiny_model("tiny-llama")
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(2))
    eager = model.generate(ids, max_new_tokens=20)
    assert torch.equal(model.generate(ids, max_new_tokens=20, compile=True), eager)
    assert torch.equal(model.generate(ids[:, :5], max_new_tokens=20, compile=True), model.generate(ids[:, :5], 20))
    assert not any(name.startswith("_qkv") for name in vars(model))  # the compiled step is not parked on the model


def test_compile_refuses_padding():
    model = tiny_model("tiny-gpt2")
    ids = torch.randint(0, 512, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, max_new_tokens=3, attention_mask=mask, compile=True)


def test_compile_refuses_beam_search():
    with pytest.raises(ValueError, match="beam search"):
        tiny_model("tiny-gpt2").generate(torch.randint(0, 512, (1, 4)), max_new_tokens=3, num_beams=2, compile=True)


def test_packed_quantized_model_compiles_by_default_and_equals_eager(monkeypatch, tmp_path):
    """compile=None compiles a bfloat16 model with packed weights (cached under $QKV_HOME/compile),
    and greedy decoding through the compiled step picks the eager tokens; padding and
    QKV_COMPILE=0 decode eagerly."""
    from qkv.generation import static_step
    from qkv.nn.quant import quantize_model

    monkeypatch.delenv("QKV_COMPILE", raising=False)
    monkeypatch.setenv("QKV_AOT", "0")  # torch.compile's step (the ahead-of-time one: test_aot_step.py)
    model = quantize_model(tiny_model("tiny-llama", d_model=64, n_heads=4, n_kv_heads=2, d_ff=128), "int4")
    model.to(torch.bfloat16)
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(4))
    assert static_step.auto_compile(model)
    assert not static_step.auto_compile(model, torch.tensor([[0, 1, 1, 1, 1, 1]]))
    eager = model.generate(ids, max_new_tokens=12, compile=False)
    assert model not in static_step._COMPILED
    assert torch.equal(model.generate(ids, max_new_tokens=12), eager)
    assert model in static_step._COMPILED  # the default took the compiled step
    monkeypatch.setenv("QKV_COMPILE", "0")
    assert not static_step.auto_compile(model)
    assert not static_step.auto_compile(tiny_model("tiny-llama"))  # dense float32: eager


def test_inductors_simd_probes_pass_from_memory_once_passed(monkeypatch, tmp_path):
    """remember_simd_probes: a library whose probe passed is not probed again (in any process: the
    list is a file in the compile cache); a failed probe is not remembered; a vanished library is."""
    from torch._inductor import cpu_vec_isa

    from qkv.generation import static_step

    calls = []
    monkeypatch.setattr(cpu_vec_isa.VecISA, "_probe_load", lambda self, path: calls.append(path) or "bad" not in path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    static_step.remember_simd_probes()
    static_step.remember_simd_probes()  # idempotent: wraps once
    isa = cpu_vec_isa.VecAVX2()
    good, bad = tmp_path / "good.so", tmp_path / "bad.so"
    good.touch()
    bad.touch()
    assert [isa._probe_load(str(good)) for _ in range(3)] == [True] * 3
    assert [isa._probe_load(str(bad)) for _ in range(2)] == [False] * 2
    assert calls == [str(good), str(bad), str(bad)]
    assert (tmp_path / "simd-probes-passed").read_text().splitlines() == [str(good)]
    good.unlink()
    assert isa._probe_load(str(good)) and calls[-1] == str(good)  # gone: probed again
