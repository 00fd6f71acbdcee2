"""Keep a worker's large buffers in the heap (glibc malloc tuning).

Every instance passes through a few buffers of its own size (the received dataset, the
shuffled copy, the compressed frame). glibc serves allocations above its mmap threshold
(128 KiB at start, raised only as mmapped chunks are freed) with a fresh mmap: every page
of every such buffer is then faulted in and zeroed by the kernel, and unmapped again on
free. For CT-sized instances that kernel work was a large share of the worker's CPU.
Serving them from the heap, and trimming the heap only past a large slack, reuses the
same pages instead (what it saved: docs/benchmarks.md). Datasets over the spill
threshold never sit whole in memory, so the heap stays bounded.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("stowage.worker")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20    # allocations up to this size come from the heap
TRIM_THRESHOLD = 64 << 20    # free heap beyond this much is given back to the system


def keep_large_buffers_in_heap() -> bool:
    """Tune glibc's malloc for this process; False (and nothing changed) elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.info("malloc tuning not applied")
    return ok
