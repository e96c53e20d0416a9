"""Default thread count: one per physical core, unless the environment says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import qkv.threads as threads


def test_physical_cores_counts_distinct_cores():
    cpus = os.sched_getaffinity(0)
    topology = [Path(f"/sys/devices/system/cpu/cpu{c}/topology") for c in cpus]
    pairs = {((t / "physical_package_id").read_text(), (t / "core_id").read_text()) for t in topology}
    assert threads.physical_cores() == len(pairs) <= len(cpus)


def test_use_default_threads_honours_qkv_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_DONE", False)
    monkeypatch.setenv("QKV_THREADS", "1")
    try:
        assert threads.use_default_threads() == 1
        monkeypatch.setenv("QKV_THREADS", "2")
        assert threads.use_default_threads() == 1  # once per process
        monkeypatch.setattr(threads, "_DONE", False)
        monkeypatch.delenv("QKV_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert threads.use_default_threads() == threads.physical_cores()
    finally:
        torch.set_num_threads(before)


def test_one_thread_restores_the_count_after_an_error():
    before = torch.get_num_threads()
    try:
        with threads.one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before
