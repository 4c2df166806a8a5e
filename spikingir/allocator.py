"""CPU allocator setting for processes that run SNNs on the CPU.

An SNN allocates and frees tensors of ``steps x`` a layer's activations at every
layer (a DnCNN SNN on a 256x256 image at T=10: ~185 MB each). glibc serves every
allocation above its mmap threshold (at most 32 MB by default) with a fresh
``mmap`` and returns it with ``munmap`` when freed, so each new tensor is paid
again in page faults on first touch. :func:`keep_freed_memory` raises the
threshold and stops trimming, so freed blocks stay in the heap and are reused
with their pages already mapped. Measured on the 2-core development VM (glibc
2.36): ``y = x + 1; z = y * 2`` on an 11x64x128x128 tensor 78.0 -> 24.8 ms;
``spikingir evaluate`` of the DnCNN SNN on one Set12 image at T=10, one thread,
two other jobs on the machine: 35.2 -> 23.2 s wall (system time 8.8 -> 1.4 s),
peak RSS 1.74 -> 2.04 GB (the cost: freed memory stays with the process).

The ``spikingir`` command calls it at start (``SPIKINGIR_KEEP_FREED_MEMORY=0``
turns that off); a library import never changes the allocator.
"""
import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Ask glibc's malloc to serve allocations below ``mmap_threshold`` bytes from
    the heap and to keep up to ``trim_threshold`` bytes of freed memory. Returns
    True when applied, False where there is no glibc ``mallopt`` (macOS, musl,
    Windows) or it refused the values; nothing else changes then."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and \
        mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
