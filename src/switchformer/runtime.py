"""Process-level runtime tuning that the library never applies on import; callers opt in."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Keep large freed CPU buffers in the heap instead of returning them to the OS (glibc only).

    PyTorch's CPU allocator has no cache: every tensor above glibc's mmap threshold (32 MiB at
    most) is a fresh ``mmap`` whose pages fault in one by one on first touch. A stacked expert
    weight gradient (``[E, d, f]``, 256 MiB at E=64, d=512, f=2048 in fp32) is such a tensor, born
    anew every backward; measured here, page faults doubled the cost of computing it. Raising the
    mmap and trim thresholds lets glibc recycle those buffers, as jemalloc or tcmalloc would.
    Returns True if applied. Affects the whole process; call it once, early, from a program's
    entry point (the trainer and the benchmarks do), never from library code.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold_bytes)
        )
    except (OSError, AttributeError):
        return False
