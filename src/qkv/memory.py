"""Giving memory back to the OS on Linux/glibc, so that peak and resident sizes reflect the model.

`qkv.load` sets glibc's mmap threshold to glibc's own ceiling (`reuse_large_blocks`, 32 MiB):
below it a freed block stays in the heap and is reused, where a block of its own (mmap) would be
returned on free and page-faulted in afresh on the next use. A 512-token prompt through SmolLM2's
packed layers ran 1.5x slower with the threshold at 1 MiB, and loading that model 0.1 s slower
(its temporaries faulted in again and again) and with a higher peak. After loading, `trim` gives
the freed heap memory back: loading a 135M-parameter GGUF leaves ~200 MB of it. All are no-ops
where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
REUSE_THRESHOLD = 32 << 20  # glibc's own upper bound for its adaptive threshold


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def reuse_large_blocks() -> None:
    """Set glibc's mmap threshold to REUSE_THRESHOLD, and its trim threshold to twice that (as its
    adaptive mode does): blocks below it are reused from the heap, not returned and faulted in again."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, REUSE_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * REUSE_THRESHOLD)


def trim() -> None:
    """Return glibc's free heap memory to the OS (since glibc 2.8, free pages anywhere in its heaps)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
