"""The one thread that owns all MLX work, and its queue of jobs.

The event loop only submits jobs and awaits their futures; it never blocks on MLX.
A queued job can be withdrawn at once; a running job sees `cancelled` between tokens.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Busy

log = logging.getLogger("localmlx.engine")


@dataclass(eq=False)
class Job:
    """One unit of engine work. `run` executes on the engine thread and may read
    `cancelled` (set from the loop) to stop early."""

    kind: str
    run: Callable[["Job"], Any]
    model: str | None = None
    cancelled: bool = False
    cancel_reason: str = "client"
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    future: asyncio.Future | None = None


class EngineWorker:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_queue: int) -> None:
        self._loop = loop
        self._max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> list[Job]:
        return list(self._queue)

    def submit(self, job: Job, *, force: bool = False) -> asyncio.Future:
        """Queue a job; `force` bypasses the queue cap (for lifecycle work like unloads)."""
        if not force and len(self._queue) >= self._max_queue:
            raise Busy(f"Busy: {len(self._queue)} requests already queued",
                       queued=len(self._queue), maxQueue=self._max_queue)
        job.future = self._loop.create_future()
        with self._ready:
            self._queue.append(job)
            self._ready.notify()
        return job.future

    def withdraw(self, job: Job) -> bool:
        """Remove a job that has not started. False if it already runs or ran."""
        with self._ready:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
        return True

    def stop(self, timeout: float) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self.current = job
            job.started_at = time.perf_counter()
            try:
                outcome, failed = job.run(job), False
            except BaseException as exc:  # delivered to the awaiting request
                outcome, failed = exc, True
            finally:
                self.current = None
            self._resolve(job, outcome, failed)

    def _resolve(self, job: Job, outcome: Any, failed: bool) -> None:
        def settle() -> None:
            if job.future is None or job.future.done():
                return
            if failed:
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # loop closed: the process is ending
            pass
