"""How many threads torch computes with: one per physical core by default.

A second hardware thread on a core shares its caches and vector units; for memory-bound
inference (batch-1 decoding reads every weight once a token) it only adds contention, so qkv
sets torch's intra-op threads to the number of physical cores the process may run on, once,
unless OMP_NUM_THREADS or QKV_THREADS says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

_DONE = False
T = TypeVar("T")


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (Linux sysfs);
    the CPU count where that cannot be read."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus) or 1
    return len(cores) or 1


def use_default_threads() -> int:
    """Set torch's thread count to QKV_THREADS, else (without OMP_NUM_THREADS) to the physical
    cores; once per process. Returns the count in use."""
    global _DONE
    if not _DONE:
        _DONE = True
        wanted = os.environ.get("QKV_THREADS")
        if wanted and wanted.isdigit() and int(wanted) > 0:
            torch.set_num_threads(int(wanted))
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(physical_cores())
    return torch.get_num_threads()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops on the calling thread only, then restore torch's thread count.

    For loading: thousands of short, memory-bound ops (dequantizing, repacking). A second thread
    gains little on an idle machine, and on a busy one every op waits for a worker the OS has
    descheduled (SmolLM2 Q4_1 on 2 cores with other work running: 0.6 s on one thread, 9 s on two).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def in_own_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` run on a new thread that ends with it: its result, or its exception.

    For processes whose compute runs on threads of their own (`qkv serve`'s scheduler): OpenMP
    keeps a team of worker threads for each thread that ran a parallel region, as long as that
    thread lives, and while the main thread holds one, parallel regions on other threads run
    several times slower (`benchmarks/omp_threads.py` measures it: an elementwise op about 5x on
    2 cores). Loading a model here leaves no team behind on the caller. The caller's torch thread
    count is set to the one `fn` ended with (OpenMP keeps it per thread; setting it starts no team).
    """
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised on the caller's thread
            out["error"] = exc
        out["threads"] = torch.get_num_threads()

    worker = threading.Thread(target=run, name=f"qkv-{getattr(fn, '__name__', 'work')}")
    worker.start()
    worker.join()
    torch.set_num_threads(out["threads"])
    if "error" in out:
        raise out["error"]
    return out["result"]
