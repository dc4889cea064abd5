"""Memory numbers the sidecar reports: MLX active/peak/cache bytes and process RSS."""

from __future__ import annotations

import functools

import psutil


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "memory limit" in text


@functools.cache
def _this_process() -> psutil.Process:
    return psutil.Process()


def rss_bytes() -> int:
    """Current resident set size (not the peak, which is all getrusage tells on macOS)."""
    return int(_this_process().memory_info().rss)


def active_bytes() -> int:
    import mlx.core as mx

    return int(mx.get_active_memory())


def memory_snapshot() -> dict[str, int]:
    """MLX's counters are plain reads: safe from any thread while the engine works."""
    import mlx.core as mx

    return {"activeBytes": int(mx.get_active_memory()), "peakBytes": int(mx.get_peak_memory()),
            "cacheBytes": int(mx.get_cache_memory()), "rssBytes": rss_bytes()}
