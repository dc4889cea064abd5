"""Memory numbers the sidecar reports: MLX active/peak/cache bytes and process RSS."""

from __future__ import annotations

import os
import resource
import sys


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "memory limit" in text


def rss_bytes() -> int:
    """Current resident set size; falls back to the peak where /proc is missing (macOS)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def active_bytes() -> int:
    import mlx.core as mx

    return int(mx.get_active_memory())


def memory_snapshot() -> dict[str, int]:
    """MLX's counters are plain reads: safe from any thread while the engine works."""
    import mlx.core as mx

    return {"activeBytes": int(mx.get_active_memory()), "peakBytes": int(mx.get_peak_memory()),
            "cacheBytes": int(mx.get_cache_memory()), "rssBytes": rss_bytes()}
