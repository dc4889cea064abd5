"""`mx.clear_cache` waits for the work queued on MLX's streams holding the GIL.

`mx.eval` and `mx.synchronize` let the GIL go while they wait; `mx.clear_cache` does not, and
mlx-lm's decode loops call it with the next step already queued. For a whole step, then, no
other thread of the process runs: the writer cannot send the token just made, the reader
cannot take a cancel, and on rank 0 of a group the monitor cannot see a silent follower, so a
collective stuck on that follower froze the process with the GIL held (only faulthandler's
C-level backstop could end it, and the requests in flight saw an exit rather than -32019).

`install` makes `mx.clear_cache` first wait for the streams that generation runs on, with the
GIL released; what is left for the original is only to free the cache.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

# Modules whose `generation_stream` the engine runs its steps on (mlx-vlm only once imported).
_GENERATION_STREAMS = ("mlx_lm.generate", "mlx_vlm.generate.common")


def install() -> None:
    """Idempotent; call it on the thread that runs MLX work (the streams are thread-local)."""
    import mlx.core as mx

    if getattr(mx.clear_cache, "waits_without_the_gil", False):
        return
    mx.clear_cache = _waiting_first(mx, mx.clear_cache)


def _waiting_first(mx: Any, clear_cache: Callable[[], None]) -> Callable[[], None]:
    def clear_cache_waiting_without_the_gil() -> None:
        for stream in _streams(mx):
            mx.synchronize(stream)
        clear_cache()

    clear_cache_waiting_without_the_gil.waits_without_the_gil = True  # type: ignore[attr-defined]
    return clear_cache_waiting_without_the_gil


def _streams(mx: Any) -> Iterator[Any]:
    seen: list[Any] = []
    candidates = [mx.default_stream(mx.default_device()), mx.default_stream(mx.cpu)]
    for name in _GENERATION_STREAMS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "generation_stream", None) is not None:
            candidates.append(module.generation_stream)
    for stream in candidates:
        if stream not in seen:
            seen.append(stream)
            yield stream
