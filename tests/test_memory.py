"""qkv.memory: memory freed after loading goes back to the OS (glibc only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qkv.memory as memory

CHILD = """
import torch, qkv.memory as memory
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20
memory.reuse_large_blocks()              # blocks below 32 MiB come from the heap and are kept
blocks = [torch.ones(1 << 18) for _ in range(200)]   # 200 x 1 MiB
before = rss()
del blocks
kept = rss()
memory.trim()
print(before, kept, rss())
"""


@pytest.mark.skipif(memory._libc() is None, reason="glibc's mallopt/malloc_trim are not available here")
def test_trim_returns_freed_heap_memory():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60)
    before, kept, trimmed = map(int, out.stdout.split())
    assert kept > before - 50  # freed, but kept by the heap for reuse
    assert trimmed < kept - 150  # trim gave (most of) the 200 MiB back
