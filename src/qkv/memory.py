"""Giving memory back to the OS on Linux/glibc, so that peak and resident sizes reflect the model.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
loading's many transient tensors come from the heap and stay resident once freed: loading a
135M-parameter GGUF left ~200 MB of freed memory in the process. So loading pins the threshold
low (`keep_large_blocks_mapped`: large blocks come from mmap and go back on free) and `trim`s
after. Running a model wants the opposite: a block that is mapped on every use is page-faulted
on every use (a 512-token prompt through SmolLM2's packed layers ran 1.5x slower), so
`reuse_large_blocks` then sets the threshold to glibc's own ceiling, where freed activations
are reused. All are no-ops where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 20  # while loading, blocks of 1 MiB and more: mapped, and unmapped when freed
REUSE_THRESHOLD = 32 << 20  # afterwards: glibc's own upper bound for its adaptive threshold


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_large_blocks_mapped() -> None:
    """Pin glibc's mmap threshold at MMAP_THRESHOLD (it stops adapting upward)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def reuse_large_blocks() -> None:
    """Set glibc's mmap threshold to REUSE_THRESHOLD, and its trim threshold to twice that (as its
    adaptive mode does): blocks below it are reused from the heap, not returned and faulted in again."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, REUSE_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * REUSE_THRESHOLD)


def trim() -> None:
    """Return the free memory at the top of glibc's heaps to the OS."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
