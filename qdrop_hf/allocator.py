"""Keep freed CPU tensor memory in the process while a reconstruction loop runs.

glibc serves allocations above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh
``mmap`` pages and returns them on free, so every activation-sized temporary of a CPU
forward/backward pays a page fault per 4 KiB on first touch. A reconstruction loop allocates the same
few shapes thousands of times; with the thresholds raised those blocks are reused from the heap: 4-5x
faster iterations on an EfficientNet-Lite0 MBConv block, same results (``benchmarks/iteration_cost.py``).

Only inside the loop, though: the calibration caches are allocated outside it, and heap-allocated
long-lived caches interleaved with freed temporaries would pin those holes for the whole run. On
exit the default thresholds are restored and the freed heap is handed back. No effect on CUDA
tensors, or off glibc.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HIGH = 1 << 30  # mallopt takes an int
_DEFAULT = 128 * 1024


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


@contextlib.contextmanager
def freed_memory_kept():
    """Before: free heap trimmed. Inside: freed tensor memory is reused, not unmapped. After: defaults
    back, free heap trimmed again."""
    if _LIBC is None:
        yield
        return
    _LIBC.malloc_trim(0)  # hand back what caching freed (e.g. full-precision records of a half-precision cache)
    if _LIBC.mallopt(_M_MMAP_THRESHOLD, _HIGH) != 1:
        yield
        return
    _LIBC.mallopt(_M_TRIM_THRESHOLD, _HIGH)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _DEFAULT)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT)
        _LIBC.malloc_trim(0)
