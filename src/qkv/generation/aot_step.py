"""The static decode step compiled ahead of time with AOTInductor, loaded without dynamo.

`torch.compile` re-traces the model with dynamo in every new process, even when inductor's disk
cache holds the compiled code (seconds for a 30-layer model). Here the step (`static_logits`) is
exported once with `torch.export` for one set of input shapes (batch size, cache length, position
shape), compiled by AOTInductor into `$QKV_HOME/compile/aoti/<key>.pt2`, and later processes load
that package through torch's C++ loader (`torch._C._aoti`): nothing is traced, and loading it
imports neither dynamo nor inductor.

Weights are not in the package (`aot_inductor.package_constants_in_so=False`): it holds the step's
code for one architecture and shape, and the live model's own tensors are handed to it at load,
user-managed, so there is no copy in memory and none on disk. A JSON side-car names each constant's
tensor in the model (a parameter, a buffer, or a tensor attribute such as a packed linear's kernel
form). The few constants inductor makes itself (the int4 matmul's group size, a scalar tensor) are
stored in the side-car by value. The key hashes what the code depends on: the model config, the
names, shapes and dtypes of the model's tensors (so the quantization layout), the input shapes,
the thread count (inductor's loops are built for it), the torch version, the CPU's SIMD level and
the source of the modules that build the graph.

The KV cache tensors are inputs, written in place by the compiled step as the eager step writes
them (tested against it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qkv.atomic import atomic_write_text
from qkv.cache import KVCache

MAX_STORED_NUMEL = 64  # constants that are not model tensors are stored by value up to this size
FORMAT = 1  # the side-car's layout; part of the key


class AotUnavailable(RuntimeError):
    """Why the ahead-of-time step cannot run; the caller falls back to `torch.compile`."""


def aot_dir() -> Path:
    """Where packages live: `compile_cache_dir()/aoti`."""
    from qkv.generation.static_step import compile_cache_dir

    return compile_cache_dir() / "aoti"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{path: tensor} for every tensor the model holds: parameters, buffers, and tensor attributes
    (or tuples of them, such as a packed linear's kernel form). A path is "module#attr" or
    "module#attr#i" ("" is the model itself); a tensor held twice keeps its first path."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, module in model.named_modules():
        named = [*module._parameters.items(), *module._buffers.items()]
        for attr, value in sorted(vars(module).items()):
            if isinstance(value, torch.Tensor):
                named.append((attr, value))
            elif isinstance(value, tuple):
                named += [(f"{attr}#{i}", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
        for name, tensor in named:
            if tensor is not None and tensor.device.type != "meta" and id(tensor) not in seen:
                seen.add(id(tensor))
                out[f"{mname}#{name}"] = tensor
    return out


def resolve(model: torch.nn.Module, path: str) -> torch.Tensor | None:
    """The tensor at a `model_tensors` path, or None where the model holds none there now."""
    mname, attr, *index = path.split("#")
    try:
        value = getattr(model.get_submodule(mname), attr)
        value = value[int(index[0])] if index else value
    except (AttributeError, IndexError, TypeError):
        return None
    return value if isinstance(value, torch.Tensor) else None


_SOURCE_DIGEST: list[str] = []


def source_digest() -> str:
    """A hash of the modules that build the step's graph: an edit there must not reuse old code."""
    if not _SOURCE_DIGEST:
        root = Path(__file__).resolve().parent.parent
        files = [*root.glob("nn/*.py"), *root.glob("models/*.py"), *root.glob("kernels/*.py")]
        files += [root / "cache.py", root / "config.py", root / "generation" / "static_step.py", Path(__file__)]
        h = hashlib.sha256()
        for f in sorted(files):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
        _SOURCE_DIGEST.append(h.hexdigest())
    return _SOURCE_DIGEST[0]


def package_key(model: torch.nn.Module, inputs: list[torch.Tensor], tensors: dict[str, torch.Tensor]) -> str:
    """The package's name for `model`'s step on the flat inputs [ids, input_pos, *k, *v]."""
    from qkv import kernels

    native = sorted(p.stem for p in Path(kernels.__file__).parent.glob("*.c") if kernels.library(p.stem) is not None)
    described = {
        "format": FORMAT,
        "config": repr(model.config),
        "tensors": [(p, list(t.shape), str(t.dtype)) for p, t in tensors.items()],
        "inputs": [(list(t.shape), str(t.dtype)) for t in inputs],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "native": native,  # the C kernels that load here (the graph calls some as operators)
        "source": source_digest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


class _ExportedStep(torch.nn.Module):
    """`static_logits` with the cache's tensors as inputs (what `torch.export` traces)."""

    def __init__(self, model: torch.nn.Module, cache: KVCache) -> None:
        super().__init__()
        self.model = model
        self.template = cache

    def forward(self, input_ids, input_pos, ks: tuple[torch.Tensor, ...], vs: tuple[torch.Tensor, ...]):
        from qkv.generation.static_step import static_logits

        cache = copy.copy(self.template)
        cache.k, cache.v = list(ks), list(vs)
        return static_logits(self.model, input_ids, input_pos, cache)


def _capture_constants() -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """Record {constant name the package loads by: tensor} as AOTInductor compiles; -> (record, undo)."""
    from torch._inductor.codecache import AotCodeCompiler

    record: dict[str, torch.Tensor] = {}
    compile_ = AotCodeCompiler.__dict__["compile"]

    def capturing(cls, graph, *args, **kwargs):
        for name, tensor in graph.constants.items():  # named as the C++ wrapper names them
            fqns = graph.dynamo_flat_name_to_original_fqn
            record[fqns.get(name, name) if name in fqns else graph.allocated_constant_name.get(name, name)] = tensor
        return compile_.__func__(cls, graph, *args, **kwargs)

    AotCodeCompiler.compile = classmethod(capturing)
    return record, lambda: setattr(AotCodeCompiler, "compile", compile_)


def build_package(model: torch.nn.Module, cache: KVCache, inputs: list[torch.Tensor], path: Path) -> None:
    """Export and compile the step for these inputs into `path` (.pt2) and its side-car (.json)."""
    from qkv.generation.static_step import remember_simd_probes, use_compile_cache_dir

    use_compile_cache_dir()
    remember_simd_probes()
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(cache.k)
    args = (inputs[0], inputs[1], tuple(inputs[2 : 2 + n]), tuple(inputs[2 + n :]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")  # torch's own pickling
        constants, operators = _compile(model, cache, args, path)
    atomic_write_text(
        path.with_suffix(".json"),
        json.dumps({"format": FORMAT, "operators": operators, "constants": constants}, indent=1),
    )


def _compile(model: torch.nn.Module, cache: KVCache, args: tuple, path: Path) -> tuple[dict, list[str]]:
    """Export, compile and package into `path`; -> (the side-car's constants, qkv operators called)."""
    with torch.no_grad():
        program = torch.export.export(_ExportedStep(model, cache), args, strict=False)
    from torch._inductor import aoti_compile_and_package

    # qkv's own operators (`qkv.kernels.ops`) run through the package's proxy executor, which finds
    # them registered by name: a later process imports that module before loading.
    operators = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("qkv.")})
    record, undo = _capture_constants()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.pt2")
    try:
        aoti_compile_and_package(
            program, package_path=str(tmp), inductor_configs={"aot_inductor.package_constants_in_so": False}
        )
        paths = {id(t): p for p, t in model_tensors(model).items()}
        constants = {}
        for name, tensor in record.items():
            entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
            if id(tensor) in paths:
                entry["path"] = paths[id(tensor)]
            elif tensor.numel() <= MAX_STORED_NUMEL:
                entry["value"] = tensor.flatten().tolist()
            else:
                raise AotUnavailable(f"the compiled step's constant {name} {tuple(tensor.shape)} is not a model tensor")
            constants[name] = entry
        os.replace(tmp, path)
    finally:
        undo()
        tmp.unlink(missing_ok=True)
    return constants, operators


class AotStep:
    """A loaded package bound to a model's tensors: call it with the flat inputs
    [ids [B, 1], input_pos, *k, *v] (the cache's tensors, updated in place) -> logits [B, 1, V]."""

    def __init__(self, path: Path, model: torch.nn.Module) -> None:
        meta = json.loads(path.with_suffix(".json").read_text())
        self.constants: dict[str, dict] = meta["constants"]
        if meta["operators"]:
            import qkv.kernels.ops  # noqa: F401  (registers them)
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        needed = set(self.loader.get_constant_fqns())
        if needed - set(self.constants):
            raise AotUnavailable(f"{path.name}: its side-car does not name {sorted(needed - set(self.constants))[:3]}")
        self.stored = {
            name: torch.tensor(e["value"], dtype=getattr(torch, e["dtype"])).view(e["shape"])
            for name, e in self.constants.items()
            if "value" in e
        }
        self.bound: dict[str, torch.Tensor] = {}
        self.bind(model)

    def bind(self, model: torch.nn.Module) -> None:
        """Hand the model's current tensors to the package (again, if any was replaced since)."""
        tensors = {}
        for name, e in self.constants.items():
            t = self.stored[name] if "value" in e else resolve(model, e["path"])
            if t is None or list(t.shape) != e["shape"] or str(t.dtype).removeprefix("torch.") != e["dtype"]:
                raise AotUnavailable(f"the model's {e.get('path', name)} no longer matches the compiled step")
            tensors[name] = t
        if any(self.bound.get(name) is not t for name, t in tensors.items()):
            # user-managed: the package reads these tensors in place; self.bound keeps them alive
            self.loader.load_constants(tensors, False, True, True)
            self.bound = tensors

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.loader.boxed_run(inputs)[0]


_STEPS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, AotStep | Exception]] = weakref.WeakKeyDictionary()


def aot_step(model: torch.nn.Module, cache: KVCache, inputs: list[torch.Tensor]) -> AotStep:
    """The ahead-of-time step of `model` for inputs shaped like these, bound to the model's tensors:
    kept per process, else loaded from its package, else built (exported and compiled, once per
    machine). Raises AotUnavailable (or what export/compile raised) where it cannot be had."""
    shapes = tuple((tuple(t.shape), t.dtype) for t in inputs)
    steps = _STEPS.setdefault(model, {})
    step = steps.get(shapes)
    if isinstance(step, Exception):  # failed before in this process: not exported again
        raise step
    if step is not None:
        step.bind(model)
        return step
    try:
        path = aot_dir() / f"{package_key(model, inputs, model_tensors(model))}.pt2"
        if not (path.exists() and path.with_suffix(".json").exists()):
            build_package(model, cache, inputs, path)
        step = steps[shapes] = AotStep(path, model)
    except Exception as exc:
        steps[shapes] = exc
        raise
    return step
