"""Memory numbers the sidecar reports (MLX active/peak/cache bytes and process RSS), and
giving memory freed by a large request back to the OS."""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable

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


def release_memory(mlx_cache: bool = False) -> None:
    """After a large request or an unload: collect the reference cycles that may still hold
    its data (an exception's traceback holds the frames that held a request's text), empty
    MLX's buffer cache when asked (on the engine thread only), then hand the C heap's free
    pages back to the OS. glibc keeps them otherwise: freeing a large block raises its
    threshold for mapping blocks of their own, so later ones come from the heap, and a heap
    or a thread's arena shrinks only from the top. Where there is no malloc_trim (macOS,
    musl), the allocator returns large blocks by itself and only the collection runs."""
    gc.collect()
    if mlx_cache:
        import mlx.core as mx

        mx.clear_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no C library to look in
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim
