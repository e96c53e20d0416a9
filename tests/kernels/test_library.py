import shutil

import pytest

from qkv import kernels

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on this machine")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache under a temporary QKV_HOME, and `library`'s memo cleared around the test."""
    monkeypatch.setenv("QKV_HOME", str(tmp_path))
    kernels.library.cache_clear()
    kernels.function.cache_clear()
    yield tmp_path / "kernels"
    kernels.library.cache_clear()
    kernels.function.cache_clear()


@needs_compiler
def test_builds_once_into_the_cache_and_exports_the_kernel(fresh):
    lib = kernels.library("int4_dense")
    assert lib is not None and hasattr(lib, "qkv_int4_dense_bf16")
    (built,) = fresh.iterdir()  # one file: no temporary or .c file left beside it
    assert built.name.startswith("int4_dense-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    kernels.library.cache_clear()
    kernels.function.cache_clear()
    assert kernels.library("int4_dense") is not None and built.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_qkv_native_0_turns_the_kernels_off(fresh, monkeypatch):
    monkeypatch.setenv("QKV_NATIVE", "0")
    assert kernels.library("int4_dense") is None
    assert kernels.unavailable("int4_dense") == "QKV_NATIVE=0"


def test_a_failing_compiler_leaves_nothing_behind_and_says_why(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that exits 1
    assert kernels.library("int4_dense") is None
    assert "building int4_dense.c failed" in kernels.unavailable("int4_dense")
    assert not fresh.exists() or list(fresh.iterdir()) == []


def test_a_missing_compiler_says_so(fresh, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-qkv")
    assert kernels.library("int4_dense") is None
    assert "no C compiler" in kernels.unavailable("int4_dense")


def test_constant_result_is_read_once_at_trace_time_and_imports_no_dynamo():
    """`constant_result` marks a function as torch's `assume_constant_result` does, without importing
    dynamo: a compiled graph calls it once while tracing and keeps the value (a plain function would
    be traced into, its side effect replayed at every call), and importing the modules that use it
    leaves torch._dynamo unimported."""
    import subprocess
    import sys

    import torch

    code = "import sys, qkv.loading, qkv.nn.quant, qkv.kernels.ops; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    calls: list[int] = []

    @kernels.constant_result
    def flag() -> bool:
        calls.append(1)
        return True

    @torch.compile(fullgraph=True, backend="eager")
    def step(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if flag() else x - 1

    for _ in range(3):
        assert torch.equal(step(torch.zeros(2)), torch.ones(2))
    assert calls == [1]
