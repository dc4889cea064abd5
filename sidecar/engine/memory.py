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


class MemoryTracker:
    """MLX's peak counter is reset per request (so each request reports its own peak);
    the process-wide peak is kept here across those resets."""

    def __init__(self) -> None:
        self._process_peak = 0

    def begin_request(self) -> None:
        import mlx.core as mx

        self._process_peak = max(self._process_peak, mx.get_peak_memory())
        mx.reset_peak_memory()

    def request_peak(self) -> int:
        import mlx.core as mx

        return int(mx.get_peak_memory())

    def snapshot(self) -> dict[str, int]:
        import mlx.core as mx

        peak = max(self._process_peak, mx.get_peak_memory())
        return {"activeBytes": int(mx.get_active_memory()), "peakBytes": int(peak),
                "cacheBytes": int(mx.get_cache_memory()), "rssBytes": rss_bytes()}
