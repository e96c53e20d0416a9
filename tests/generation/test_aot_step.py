"""The ahead-of-time decode step (`qkv.generation.aot_step`): AOTInductor packages that hold the
step's code but not the weights, loaded in later processes without tracing."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from qkv.generation import aot_step, static_step
from tiny_models import tiny_model

TESTS = Path(__file__).resolve().parents[1]
TINY = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128}


def packed_tiny():
    """A tiny LLaMA with packed int4 weights computing in bfloat16 (what compiles by default)."""
    from qkv.nn.quant import quantize_model

    return quantize_model(tiny_model("tiny-llama", **TINY), "int4").to(torch.bfloat16)


@pytest.fixture(scope="module")
def shared_cache_dir(tmp_path_factory):
    """A compile cache shared by this module's tests (inductor's, and so the packages' `aot_dir()`):
    the batch-1 package is built once, by the first test that needs it."""
    return tmp_path_factory.mktemp("compile")


@pytest.fixture
def cache_dir(monkeypatch, shared_cache_dir):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(shared_cache_dir))
    monkeypatch.delenv("QKV_COMPILE", raising=False)
    monkeypatch.delenv("QKV_AOT", raising=False)
    return shared_cache_dir


def static_greedy(model, ids: torch.Tensor, n: int, compile: bool) -> torch.Tensor:
    """n greedy tokens [B, n] through `StaticStep` (compile=False: the eager static step)."""
    runner = static_step.StaticStep(model, compile=compile)
    cache = runner.new_cache(ids.shape[0], ids.shape[1] + n)
    with torch.no_grad():
        logits = runner.prefill(ids, cache)
        out = []
        for i in range(n):
            out.append(logits.argmax(-1))
            if i < n - 1:
                logits = runner.step(out[-1], ids.shape[1] + i, cache)
    return torch.stack(out, dim=1)


def test_aot_step_equals_the_eager_step_writes_the_cache_and_reads_the_live_weights(cache_dir):
    model = packed_tiny()
    runner = static_step.StaticStep(model, compile=True)  # prepares the packed kernel forms
    cache = runner.new_cache(1, 20)
    gen = torch.Generator().manual_seed(5)
    for k in cache.k + cache.v:
        k.copy_(torch.randn(k.shape, generator=gen))
    ids = torch.randint(0, 512, (1, 1), generator=gen)
    inputs = [ids, torch.tensor([7]), *cache.k, *cache.v]
    step = aot_step.aot_step(model, cache, inputs)

    (package,) = (cache_dir / "aoti").glob("*.pt2")
    side = json.loads(package.with_suffix(".json").read_text())
    named = {e["path"] for e in side["constants"].values() if "path" in e}
    assert "blocks.0.attn.qkv_proj#_kernel#1" in named  # the packed int4 values, taken from the model
    assert all("path" in e or len(e["value"]) <= aot_step.MAX_STORED_NUMEL for e in side["constants"].values())

    def eager(position: int, kv: list[torch.Tensor]) -> torch.Tensor:
        ref = copy.copy(cache)
        ref.k, ref.v = kv[: len(cache.k)], kv[len(cache.k) :]
        with torch.no_grad():
            return static_step.static_logits(model, ids, torch.tensor([position]), ref)

    for position in (7, 8, 19):
        before = [t.clone() for t in cache.k + cache.v]
        expected = eager(position, before)  # writes `before` as the eager step writes the cache
        got = step([ids, torch.tensor([position]), *cache.k, *cache.v])
        assert got.shape == expected.shape == (1, 1, 512)
        assert (got.float() - expected.float()).abs().max().item() < 0.03
        for written, ref in zip(cache.k + cache.v, before):
            assert torch.equal(written[:, :, :position], ref[:, :, :position])  # other slots untouched
            assert torch.equal(written[:, :, position + 1 :], ref[:, :, position + 1 :])
            assert (written[:, :, position].float() - ref[:, :, position].float()).abs().max().item() < 0.03

    # user-managed constants: the package reads the model's tensors themselves, not copies
    with torch.no_grad():
        model.norm.weight.mul_(-2)
    before = [t.clone() for t in cache.k + cache.v]
    expected = eager(9, before)
    got = step([ids, torch.tensor([9]), *cache.k, *cache.v])
    assert (got.float() - expected.float()).abs().max().item() < 0.06


def test_generate_takes_the_aot_step_and_a_new_process_loads_it_without_compiling(cache_dir):
    model = packed_tiny()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(4))
    reference = static_greedy(model, ids, 12, compile=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ahead-of-time")  # no fallback
        out = model.generate(ids, max_new_tokens=12)
    assert torch.equal(out[:, 6:], reference)
    assert any(isinstance(s, aot_step.AotStep) for s in aot_step._STEPS[model].values())
    assert model not in static_step._COMPILED  # torch.compile's step never ran
    packages = sorted(p.name for p in (cache_dir / "aoti").iterdir())

    child = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        from qkv.generation import aot_step
        from qkv.nn.quant import quantize_model
        from tiny_models import tiny_model
        model = quantize_model(tiny_model("tiny-llama", **{TINY!r}), "int4").to(torch.bfloat16)
        ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(4))
        tokens = model.generate(ids, max_new_tokens=12)[0].tolist()
        aot = any(isinstance(s, aot_step.AotStep) for s in aot_step._STEPS[model].values())
        compiled = "torch._inductor.compile_fx" in sys.modules
        dynamo = "torch._dynamo" in sys.modules
        print(json.dumps({{"tokens": tokens, "aot": aot, "inductor_compiled": compiled, "dynamo": dynamo}}))
    """)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == out[0].tolist()
    assert result["aot"] and not result["inductor_compiled"] and not result["dynamo"]
    assert sorted(p.name for p in (cache_dir / "aoti").iterdir()) == packages  # nothing built again


def test_a_failing_aot_step_falls_back_to_torch_compile_and_says_why_once(cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no package: it would be built

    def refuse(*args, **kwargs):
        raise aot_step.AotUnavailable("refused by the test")

    monkeypatch.setattr(aot_step, "build_package", refuse)
    monkeypatch.setattr(static_step, "_AOT_FAILURES", set())
    model = packed_tiny()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(4))
    reference = static_greedy(model, ids, 10, compile=False)
    with pytest.warns(UserWarning, match="refused by the test") as caught:
        out = model.generate(ids, max_new_tokens=10)
        again = model.generate(ids, max_new_tokens=10)
    assert sum("ahead-of-time" in str(w.message) for w in caught) == 1
    assert torch.equal(out[:, 6:], reference) and torch.equal(again, out)
    assert model in static_step._COMPILED  # torch.compile's step ran instead
    monkeypatch.setenv("QKV_AOT", "0")
    assert not static_step.StaticStep(model, compile=True).aot


def test_package_key_follows_the_shapes_threads_and_weights_layout():
    model = packed_tiny()
    static_step.StaticStep(model, compile=True)
    cache = model.new_cache(1, 256, static=True)
    inputs = [torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]), *cache.k, *cache.v]
    tensors = aot_step.model_tensors(model)
    key = aot_step.package_key(model, inputs, tensors)
    assert aot_step.package_key(model, inputs, tensors) == key
    wider = model.new_cache(1, 512, static=True)
    assert aot_step.package_key(model, [*inputs[:2], *wider.k, *wider.v], tensors) != key
    per_row = [inputs[0], torch.tensor([[3]]), *inputs[2:]]
    assert aot_step.package_key(model, per_row, tensors) != key
    assert aot_step.package_key(packed_tiny().to(torch.float32), inputs, aot_step.model_tensors(
        packed_tiny().to(torch.float32))) != key  # fmt: skip
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert aot_step.package_key(model, inputs, tensors) != key
    finally:
        torch.set_num_threads(threads)
    assert aot_step.resolve(model, "blocks.0.attn.qkv_proj#_kernel#1") is model.blocks[0].attn.qkv_proj._kernel[1]
    assert aot_step.resolve(model, "blocks.0.attn.qkv_proj#nothing") is None


@pytest.mark.slow
def test_aot_step_with_qkv_operators_at_batch_4(cache_dir):
    """Batch 4 calls qkv's native attention operator (where it builds): through AOTInductor's proxy executor."""
    from qkv import kernels

    if kernels.library("attention") is None:
        pytest.skip("qkv's native attention kernel does not build here")
    model = packed_tiny()
    ids = torch.randint(0, 512, (4, 6), generator=torch.Generator().manual_seed(6))
    reference = static_greedy(model, ids, 10, compile=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ahead-of-time")
        out = model.generate(ids, max_new_tokens=10)
    assert torch.equal(out[:, 6:], reference)
    operators = [json.loads(p.read_text())["operators"] for p in (cache_dir / "aoti").glob("*.json")]
    assert any("qkv.single_query_attention.default" in names for names in operators)


@pytest.mark.slow
def test_per_row_positions_through_the_aot_step_equal_the_eager_step(cache_dir):
    """input_pos [B, 1]: each row writes and attends at its own slot (a `qkv.serve` slot cache)."""
    model = packed_tiny()
    eager, compiled = static_step.StaticStep(model), static_step.StaticStep(model, compile=True)
    caches = [compiled.new_cache(2, 20) for _ in range(2)]
    gen = torch.Generator().manual_seed(8)
    for ks in zip(*(c.k + c.v for c in caches)):
        noise = torch.randn(ks[0].shape, generator=gen)
        for k in ks:
            k.copy_(noise)
    ids = torch.randint(0, 512, (2, 1), generator=gen)
    for positions in ([[5], [9]], [[6], [10]]):
        input_pos = torch.tensor(positions)
        with torch.no_grad():
            expected = eager.logits(ids, input_pos, caches[0])
            got = compiled.logits(ids, input_pos, caches[1])
        assert isinstance(compiled._aot[2], aot_step.AotStep)
        assert (got.float() - expected.float()).abs().max().item() < 0.03
        for ours, ref in zip(caches[1].k, caches[0].k):
            assert (ours.float() - ref.float()).abs().max().item() < 0.03


@pytest.mark.slow
def test_smollm2_greedy_tokens_through_the_aot_step_equal_the_eager_static_step(cache_dir):
    import qkv

    model = qkv.load("smollm2-135m-instruct")
    ids = torch.tensor([model.tokenizer.encode("Write a short story about a robot who learns to paint.")])
    reference = static_greedy(model, ids, 24, compile=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ahead-of-time")
        out = model.generate(ids, max_new_tokens=24, eos_token_id=[])
    assert any(isinstance(s, aot_step.AotStep) for s in aot_step._STEPS[model].values())
    assert torch.equal(out[:, ids.shape[1] :], reference)
