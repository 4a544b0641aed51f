"""Keep freed CPU tensor memory in the process instead of handing it back to the OS after every op.

glibc serves allocations above its mmap threshold (128 KiB to 32 MiB) with fresh ``mmap`` pages and
returns them on free, so every activation-sized temporary of a CPU forward/backward pays a page
fault per 4 KiB on first touch. Block reconstruction allocates the same few shapes thousands of
times; raising the thresholds lets those blocks be reused from the heap: 4-5x faster iterations on
an EfficientNet-Lite0 MBConv block, same results (``benchmarks/iteration_cost.py``). The peak
resident memory is unchanged (the high-water mark was reached anyway); the memory is simply not
returned between iterations. No effect on CUDA tensors, or off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_THRESHOLD = 1 << 30  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not possible."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
    if not done:
        logger.debug("mallopt refused the thresholds; CPU temporaries stay mmap-backed")
    return done
