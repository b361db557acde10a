"""The C allocator's thresholds for the jobs' large temporaries (glibc only).

By default glibc hands freed memory at the top of its heap back to the kernel once more than the
trim threshold is free (dynamically twice the mmap threshold, at most 64 MiB). A job that
allocates and frees the same large tensors on every update (CVPO's critic values at the
particles: several [E, B K, hidden] temporaries of 30 MB) then faults those pages in again on every
call, and system time grows. `keep_freed_memory` raises the trim threshold and fixes the mmap
threshold at the dynamic threshold's ceiling (mallopt), so that freed blocks are reused. The arithmetic stays
the same; what changes is the system time (README "Performance").
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20                      # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set the thresholds in this process; True when glibc accepted both (False on other C libraries,
    which keep their defaults)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
