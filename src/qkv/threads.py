"""How many threads torch computes with: one per physical core by default.

A second hardware thread on a core shares its caches and vector units; for memory-bound
inference (batch-1 decoding reads every weight once a token) it only adds contention, so qkv
sets torch's intra-op threads to the number of physical cores the process may run on, once,
unless OMP_NUM_THREADS or QKV_THREADS says otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

_DONE = False


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
