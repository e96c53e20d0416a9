"""Small C kernels that torch lacks, built once per machine by the system C compiler, loaded by ctypes.

Each kernel is a `.c` file beside this module (sharing the `.h` files there). `library(name)`
compiles it with `-O3 -march=native` into `$QKV_HOME/kernels/<name>-<hash>.so` (the hash covers
the sources, the flags, the compiler and the CPU's flags, so a shared cache never hands one
machine another's build) and loads it. A build takes well under a second and happens once; the
file appears atomically, so processes building side by side cannot load half a library. Without
a compiler, or with `QKV_NATIVE=0`, `library` returns None and callers keep their torch
fallback; `unavailable(name)` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")
_why_not: dict[str, str] = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled kernel `name` (from `name.c`), or None where it cannot be built here."""
    if os.environ.get("QKV_NATIVE", "1") == "0":
        _why_not[name] = "QKV_NATIVE=0"
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        _why_not[name] = "no C compiler (set CC, or install gcc)"
        return None
    from qkv.atomic import atomic_path
    from qkv.hub import qkv_home

    here = Path(__file__).parent
    source = (here / f"{name}.c").read_bytes()
    headers = [h.read_bytes() for h in sorted(here.glob("*.h"))]  # what the sources include
    key = hashlib.sha256(b"\0".join([source, *headers, " ".join(FLAGS).encode(), compiler.encode(),
                                      _cpu_flags().encode()]))  # fmt: skip
    target = qkv_home() / "kernels" / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            with atomic_path(target) as tmp:
                c_file = tmp.with_suffix(".c")
                c_file.write_bytes(source)
                try:
                    command = [compiler, *FLAGS, f"-I{here}", str(c_file), "-o", str(tmp)]
                    subprocess.run(command, check=True, capture_output=True, timeout=120)
                finally:
                    c_file.unlink(missing_ok=True)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            _why_not[name] = f"building {name}.c failed: {exc} {detail.decode(errors='replace')[-500:]}".strip()
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        _why_not[name] = f"loading {target} failed: {exc}"
        return None


@functools.cache
def function(name: str, symbol: str, argtypes: tuple) -> ctypes._CFuncPtr | None:
    """`symbol` of kernel `name` with its argument types set once, or None where it is not built."""
    lib = library(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes = list(argtypes)
    return fn


def constant_result(fn: Callable) -> Callable:
    """Mark `fn` as `torch.compiler.assume_constant_result` does: a traced graph takes its result
    as a constant instead of tracing into it (a kernel's availability, decided once per process).

    torch's decorator imports dynamo the moment it is applied, so at import time of every module
    using it: ~1 s and ~70 MB in a process that never compiles (a warm start runs an AOTInductor
    package, `qkv.generation.aot_step`). It only sets this attribute (torch 2.13's
    `torch/_dynamo/decorators.py`), which dynamo reads when it meets the call."""
    fn._dynamo_marked_constant = True
    return fn


def unavailable(name: str) -> str | None:
    """Why `library(name)` returned None (None if it was not asked, or worked)."""
    return _why_not.get(name)
