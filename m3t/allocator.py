"""Process-wide tuning of glibc malloc for the batch reads."""

from __future__ import annotations

import ctypes


def tune_allocator(threshold_bytes: int = 64 << 20) -> bool:
    """Keep the few-hundred-KiB buffers of a batch read on the heap; call once at startup.

    glibc serves allocations above its mmap threshold (128 KiB at start, then adapting)
    with fresh mmaps and unmaps them on free, so a batch read would page-fault its numpy
    buffers anew each time (benchmarks/bench_features.py measures the transform with and
    without this). Process-wide, hence explicit; returns False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold_bytes)) and bool(
        libc.mallopt(m_trim_threshold, 2 * threshold_bytes)
    )
