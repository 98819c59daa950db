"""Keeps glibc's allocator from handing freed tensor memory back to the OS between steps.

By default glibc serves a large allocation from a fresh mapping (above a threshold that
moves with the sizes freed) and trims the heap once much of it is free, so a training step
that frees and re-allocates the same activations faults in their pages again on every
step: a tenth or more of a CPU step (docs/PERFORMANCE.md). Fixing the mapping threshold at
its maximum and trimming only above 1 GiB of free heap lets every step reuse the memory of
the one before, as jemalloc or tcmalloc would.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's largest; larger tensors keep their own mappings
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds for this process; returns whether it did.

    A no-op (False) off Linux, without glibc's ``mallopt``, or when the user already set
    any of glibc's ``MALLOC_*_`` variables, which then decide.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
