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
    return _mallopt((_M_MMAP_THRESHOLD, threshold_bytes), (_M_TRIM_THRESHOLD, 2 * threshold_bytes))


def return_freed_memory(threshold_bytes: int = 1 << 20) -> bool:
    """Give every freed CPU buffer of ``threshold_bytes`` or more back to the OS at once (glibc only):
    the opposite of :func:`reuse_freed_memory`, for a process that must stay within a memory budget.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    blocks of that size come from the heap, where freed ones between live ones stay resident.
    Loading int8 experts frees a float32 copy of each expert between the int8 ones it keeps, and
    an expert cache frees the experts it evicts between those it holds: measured, 904 MiB of int8
    experts held 1,973 MiB resident with glibc's default and 1,054 MiB with a fixed threshold
    (docs/big_checkpoints.md). Returns True if applied; process-wide, for entry points (``--max-memory``
    and ``--dtype int8`` in every inference command, the big-checkpoint benchmark), never library code.
    """
    return _mallopt((_M_MMAP_THRESHOLD, threshold_bytes))


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's ``mallopt`` for each ``(parameter, value)``; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(bool(libc.mallopt(parameter, value)) for parameter, value in settings)
    except (OSError, AttributeError):
        return False


def resolve_device(name: str | None = None):
    """``torch.device`` for a ``--device`` value (None: ``cuda`` when available, else ``cpu``).

    Raises ``ValueError`` naming ``--device`` for a name torch does not know or a device this
    machine does not have (instead of torch's assertion deep inside the first allocation)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name} asked for, but this PyTorch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {name} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu" and device.type not in ("mps", "xpu"):
        raise ValueError(f"--device: unsupported device {name!r} (cpu, cuda, cuda:N)")
    return device
