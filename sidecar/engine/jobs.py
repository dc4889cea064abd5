"""Units of engine work, why they stop early, and how their outcome reaches the event loop."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import RequestCancelled, RpcError, ServerCancelled


class CancelReason(str, enum.Enum):
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
class Job:
    """One request's work for the engine thread. `cancel_reason` is written by the event
    loop (through `Engine.cancel`) and read by the engine thread between steps."""

    kind: str  # "load" | "unload" | "options" | "generate" | "embed"
    loop: asyncio.AbstractEventLoop
    model: str | None = None
    run: Callable[["Job"], Any] | None = None  # control work; generations carry a request instead
    payload: Any = None
    keep_alive: float | None = None  # the request's keepAlive: its model's once the engine takes the job
    cancel_reason: CancelReason | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    future: asyncio.Future = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    def settle(self, outcome: Any, failed: bool = False) -> None:
        """Deliver the outcome from any thread; the first outcome wins."""

        def set_outcome() -> None:
            if self.future.done():
                return
            if failed:
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)

        try:
            self.loop.call_soon_threadsafe(set_outcome)
        except RuntimeError:  # the loop is closed: the process is ending
            pass
