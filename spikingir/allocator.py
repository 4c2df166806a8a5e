"""CPU allocator setting for processes that run SNNs on the CPU.

An SNN allocates and frees tensors of ``steps x`` a layer's activations at every
layer (a DnCNN SNN on a 256x256 image at T=10: ~185 MB each). glibc serves every
allocation above its mmap threshold (at most 32 MB by default) with a fresh
``mmap`` and returns it with ``munmap`` when freed, so each new tensor is paid
again in page faults on first touch. :func:`keep_freed_memory` raises the
threshold and stops trimming, so freed blocks stay in the heap and are reused
with their pages already mapped.

Measured on the 2-core development VM (glibc 2.36): ``y = x + 1; z = y * 2`` on
an 11x64x128x128 tensor 78.0 -> 24.8 ms. ``spikingir evaluate`` of the DnCNN SNN
at T=10, 2 threads, on two 512x512 Set12 images: 112.4 -> 70.8 s wall (system
time 83.5 -> 21.6 s) -- but peak RSS 4.5 -> 8.9 GB: memory freed by large tensors
of changing sizes stays with the process, fragmented (a full Set12 evaluation at
T = 4, 5, 10 grew to 13 GB and was OOM-killed beside a second one). Hence opt-in:
``SPIKINGIR_KEEP_FREED_MEMORY=1 spikingir ...`` or a call in your own script,
where memory is plentiful or shapes are fixed (training batches). A library
import never changes the allocator.
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
