"""Units of engine work, why they stop early, and how their outcome reaches the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..errors import RequestCancelled, RpcError, ServerCancelled

T = TypeVar("T")


class CancelReason(enum.StrEnum):
    """Why work stops before it is done. The value is what `data.reason` says on the wire."""

    CLIENT = "client"  # $/cancelRequest
    SHUTDOWN = "shutdown"  # the shutdown request
    EXIT = "exit"  # the client is gone: exit, end of stdin, broken pipe
    UNLOAD = "unload"  # the model it runs on was unloaded

    def error(self) -> RpcError:
        """What a request cancelled for this reason is answered, unless its work answers for
        itself: -32800 when its client cancelled it, -32802 when the server did."""
        if self is CancelReason.CLIENT:
            return RequestCancelled("Request cancelled")
        return ServerCancelled(f"Cancelled by the server ({self.value})", reason=self.value)


@dataclass(eq=False)
class Job(Generic[T]):
    """One request's work for the engine thread, whose outcome is a `T`. `cancel_reason` is
    written by the event loop (through `Engine.cancel`) and read by the engine thread between
    steps."""

    kind: str  # "load" | "unload" | "options" | "generate" | "embed"
    loop: asyncio.AbstractEventLoop
    model: str = ""  # the model it works on; "" for work on none in particular (unloading all)
    run: Callable[[Job[T]], T] | None = None  # control work; generations carry a request instead
    payload: object = None  # what the scheduler reads: a GenerationOrder, or an EmbeddingWork
    keep_alive: float | None = None  # the request's keepAlive: its model's once the engine takes the job
    cancel_reason: CancelReason | None = None
    mirror_seq: int | None = None  # a generation the group's followers replay: its number there
    queued_at: float = field(default_factory=time.perf_counter)
    future: asyncio.Future[T] = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    def settle(self, outcome: T) -> None:
        """Deliver the outcome from any thread; the first outcome (or failure) wins."""
        self._deliver(lambda future: future.set_result(outcome))

    def fail(self, error: BaseException) -> None:
        """Deliver a failure from any thread; the first outcome (or failure) wins."""
        self._deliver(lambda future: future.set_exception(error))

    def _deliver(self, set_outcome: Callable[[asyncio.Future[T]], None]) -> None:
        def on_loop() -> None:
            if not self.future.done():
                set_outcome(self.future)

        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self.loop.call_soon_threadsafe(on_loop)
