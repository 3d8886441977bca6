"""A caching CPU allocator for training ranks: glibc malloc told to keep what it frees.

torch's CPU tensors come from plain malloc. glibc serves every block above its mmap threshold
(at most 32 MiB) with a fresh mmap and returns it with munmap on free, so each step's large
buffers (ZeRO-3's gathered parameters and flat gradient buckets, the tied embedding's gradient,
the head's dW) are new pages that the kernel must fault in and zero again, step after step. On
the 2-core benchmark machine a SmolLM2-135M ZeRO-3 rank spent ~20 % of its CPU time in the
kernel doing that (bench/README.md). With mmap off and trimming off, freed blocks stay in the
heap and are reused: the CPU counterpart of torch's CUDA caching allocator. The price is that
the resident set no longer shrinks after a peak (it stays at the high-water mark).

Only training ranks on CPU call this (train.cpu_allocator: caching, the default); GPU runs keep
their host allocations small and are left alone.
"""

from __future__ import annotations

import ctypes

# <malloc.h> parameter numbers (glibc).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1


def use_caching_malloc() -> bool:
    """Configure glibc malloc of this process to keep freed memory. False where the C library
    is not glibc (musl, macOS) or refuses; nothing is changed then."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Order matters little; both are needed: without mmap the big blocks come from the heap,
    # and without a trim threshold the heap's top is not handed back after every step.
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
