"""Keep glibc malloc from returning training-step buffers to the kernel.

PyTorch's CPU allocator is plain malloc. LeNet's activations and gradients are
blocks of 0.1-3 MB; glibc serves blocks above its mmap threshold with fresh
mmaps and trims the heap top above its trim threshold, so every step mapped,
zero-filled and unmapped the same megabytes again: about 1,200 minor page faults
per step. Raising both thresholds once at start-up keeps the freed blocks for
reuse (about 15 faults per step); bench/bench_malloc.py measured LeNet training
at 0.83x the rate without it on 2 CPU cores. The cost is that the process keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("harness")

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

# A user who tunes malloc through the environment keeps their settings.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds; what was done, for the start-up log line."""
    if not sys.platform.startswith("linux"):
        return "malloc untouched (not Linux)"
    if any(name in os.environ for name in USER_SETTINGS):
        return "malloc settings from the environment"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "malloc untouched (not glibc)"
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "malloc untouched (mallopt refused)"
    return "glibc malloc keeps freed blocks up to 32 MB"
