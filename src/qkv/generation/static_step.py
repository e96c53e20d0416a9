"""The static-shape decode step, eager or compiled once with `torch.compile`.

A static `KVCache` keeps every slot and is written at a position *tensor*, and the model's mask
is built densely from that tensor, so every decode step has the same shapes and reads no
Python-side position: inductor captures it once per model, batch size and cache size.

Compiling is automatic for models with packed quantized weights (`qkv.nn.quant`), where it is
worth most: their eager step spends more time in per-op overhead than in the 4-bit matmuls
(`auto_compile` says when). Their step is compiled ahead of time (`qkv.generation.aot_step`):
exported once per shape, compiled by AOTInductor into a package under `$QKV_HOME/compile/aoti`,
and loaded by later processes without tracing. Where that fails, or with `QKV_AOT=0`, they take
`torch.compile` with inductor's C++ wrapper, whose artifacts are cached under `$QKV_HOME/compile`
(inductor's FX graph and AOTAutograd caches); later processes re-trace the model with dynamo and
reuse them. Dense models compile only on request (`compile=True`), with `torch.compile` and
inductor's freezing, which prepacks their weights for oneDNN.
"""

from __future__ import annotations

import os
import shutil
import types
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from qkv.cache import KVCache
from qkv.generation.context import prompt_spans


def static_logits(model: torch.nn.Module, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache):
    """Logits [B, T, V] of input_ids [B, T] written at slots input_pos [T] of a static cache."""
    return model.decode(input_ids, cache, input_pos=input_pos)


def compile_cache_dir() -> Path:
    """Where compiled steps are cached: `$QKV_HOME/compile` (or $TORCHINDUCTOR_CACHE_DIR if set)."""
    from qkv.hub import qkv_home

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or qkv_home() / "compile")


def use_compile_cache_dir() -> None:
    """Point inductor at `compile_cache_dir()`; it must run before inductor is first imported,
    whose config import settles the directory once for the process."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))


def remember_simd_probes() -> None:
    """Let inductor's SIMD probes pass from memory once they have passed on this machine.

    Before compiling (or loading a cached compile), inductor builds a test library for each SIMD
    instruction set the CPU claims and loads it in a child Python, to catch a CPU or OS that claims
    more than it runs: a few tenths of a second per set, in every new process. The built libraries
    are cached under content-hashed paths, so a path whose load once succeeded (listed in
    `compile_cache_dir()/simd-probes-passed`) loads again; only those child processes are skipped.
    Inductor's settings, and so its cache keys and generated code, are untouched
    (`cpp.vec_isa_ok=True` skips the probes too, but it enters inductor's cache key, so every
    cached step would compile again). A no-op where this torch keeps its probe elsewhere.
    """
    from torch._inductor import cpu_vec_isa

    probe = getattr(cpu_vec_isa.VecISA, "_probe_load", None)
    if probe is None or getattr(probe, "_qkv_remembers", False):
        return
    passed = compile_cache_dir() / "simd-probes-passed"

    def remembered(self, output_path: str) -> bool:
        known = passed.read_text().splitlines() if passed.exists() else []
        if output_path in known and os.path.exists(output_path):
            return True
        ok = probe(self, output_path)
        if ok:
            passed.parent.mkdir(parents=True, exist_ok=True)
            with open(passed, "a") as f:  # one short line per append: whole lines even side by side
                f.write(output_path + "\n")
        return ok

    remembered._qkv_remembers = True
    cpu_vec_isa.VecISA._probe_load = remembered


def is_quantized(model: torch.nn.Module) -> bool:
    from qkv.nn.quant import QuantLinear

    return any(isinstance(m, QuantLinear) for m in model.modules())


def auto_compile(model: torch.nn.Module, attention_mask: torch.Tensor | None = None) -> bool:
    """Whether `compile=None` (the default) compiles: a decoder-only model with packed quantized
    weights computing in bfloat16 on the CPU, an unpadded batch, a C++ compiler for inductor, and
    $QKV_COMPILE not "0". Everything else (left padding, encoder-decoders, beam search) decodes eagerly."""
    if os.environ.get("QKV_COMPILE", "1") == "0" or getattr(model, "is_encoder_decoder", False):
        return False
    if attention_mask is not None and not bool(attention_mask.all()):
        return False
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return False
    return model.device.type == "cpu" and model.dtype == torch.bfloat16 and is_quantized(model)


_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, Callable] = weakref.WeakKeyDictionary()


def compiled_step(model: torch.nn.Module) -> Callable:
    """`static_logits` compiled for `model` alone.

    Each model gets its own copy of the function's code object, so dynamo's cache (kept per code
    object) never serves one model's graph to another, and the guards on the model's own modules
    and parameters can be skipped: they cost ~0.5 ms a step on SmolLM2. The model must not be
    restructured after its first compiled step (weights may change in place).
    """
    fn = _COMPILED.get(model)
    if fn is None:
        use_compile_cache_dir()
        remember_simd_probes()
        own = types.FunctionType(static_logits.__code__.replace(), static_logits.__globals__, "static_logits")
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        fn = _COMPILED[model] = torch.compile(own, options=options)
    return fn


def static_cache_len(needed: int, limit: int | None) -> int:
    """The static cache length for `needed` slots: the next power of two >= 256, within the context,
    so that a handful of graphs serve every prompt length."""
    size = max(256, 1 << (needed - 1).bit_length())
    return size if limit is None else max(needed, min(size, limit))


_AOT_FAILURES: set[str] = set()  # reasons already reported


class StaticStep:
    """Runs a model's static-shape step; `compile=True` goes through the compiled graph."""

    def __init__(self, model: torch.nn.Module, compile: bool = False) -> None:
        self.model = model
        self.compile = compile
        self.freeze = compile and not is_quantized(model)  # packed weights are not frozen (see module doc)
        if compile:
            use_compile_cache_dir()
        if compile and not self.freeze:
            from qkv.nn.quant import prepare_model

            prepare_model(model)  # the graph reads each layer's packed form as it is
        # Packed models take the ahead-of-time step (`qkv.generation.aot_step`) unless $QKV_AOT=0.
        self.aot = compile and not self.freeze and os.environ.get("QKV_AOT", "1") != "0"
        self._aot: tuple[KVCache, tuple, Callable | None] | None = None  # (cache, input shapes, step)

    def _load_aot(self, cache: KVCache, inputs: list[torch.Tensor]) -> Callable | None:
        """The ahead-of-time step for these inputs, or None (then `torch.compile`'s step runs, and
        why is said once per reason)."""
        from qkv.generation.aot_step import aot_step

        try:
            return aot_step(self.model, cache, inputs)
        except Exception as exc:  # export and AOTInductor raise many kinds; each means "use torch.compile"
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if reason not in _AOT_FAILURES:
                _AOT_FAILURES.add(reason)
                message = f"qkv: the ahead-of-time decode step is unavailable ({reason}); using torch.compile"
                warnings.warn(message, stacklevel=3)
            return None

    def new_cache(self, batch_size: int, needed: int) -> KVCache:
        """A static cache with room for `needed` slots (rounded up, see `static_cache_len`)."""
        return self.model.new_cache(batch_size, static_cache_len(needed, self.model.config.context_limit), static=True)

    def prefill(self, input_ids: torch.Tensor, cache: KVCache, chunk: int | None = None) -> torch.Tensor:
        """Write the prompt [B, T] at slots 0..T-1, `chunk` tokens per forward (None: all at once;
        see `qkv.generation.decode.prefill`), eagerly: one shape per prompt length would otherwise
        compile a graph each. Return the last position's logits [B, V]."""
        for start, end in prompt_spans(self.model.config, input_ids.shape[1], chunk):
            positions = torch.arange(start, end, device=input_ids.device)
            logits = self.model.decode(input_ids[:, start:end], cache, input_pos=positions, logits_to_keep=1)
        return logits[:, -1]

    def step(self, token: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        """Feed token [B] at slot `position`; return logits [B, V]."""
        return self.logits(token[:, None], torch.tensor([position], device=token.device), cache)[:, -1]

    def logits(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, T, V] of input_ids [B, T] written at slots input_pos ([T], or [B, T]: each row
        its own) of a static cache, through this runner's step: eager, ahead-of-time compiled, or
        `torch.compile`d. Each new shape compiles once."""
        if not self.compile:
            return static_logits(self.model, input_ids, input_pos, cache)
        if self.aot:
            inputs = [input_ids.contiguous(), input_pos.contiguous(), *cache.k, *cache.v]
            shapes = (tuple(input_ids.shape), tuple(input_pos.shape))
            if self._aot is None or self._aot[0] is not cache or self._aot[1] != shapes:
                self._aot = (cache, shapes, self._load_aot(cache, inputs))
            if self._aot[2] is not None:
                return self._aot[2](inputs)
        import torch._inductor.config as inductor_config

        # Freezing is a global inductor setting; patch it only around our own graphs. Packed models
        # get the C++ wrapper, which drops the Python between kernels (SmolLM2: 6.6 -> 6.2 ms a
        # step, measured when it came in; the first compile takes longer, ~60-70 s against ~45).
        with inductor_config.patch(freezing=self.freeze, cpp_wrapper=not self.freeze):
            return compiled_step(self.model)(self.model, input_ids, input_pos, cache)
