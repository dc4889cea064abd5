"""One request in flight, from its line to its one response (after the MCP SDK's
`RequestResponder`).

An `InFlightRequest` owns its request's id, its answer (sent exactly once), its `$/progress`
reporter, its task (whose cancel scope it cancels), and what cancelling it does. Until its method
hands work to the engine, a cancel ends its task and the request answers what its method
answers when cancelled early (-32800 or -32802; a generation: finishReason cancelled). Once
the engine has the work, a cancel asks the engine to stop it, and the work still answers for
itself (a generation with its usage; an embed between micro-batches).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio

from . import jsonrpc
from .engine.jobs import CancelReason, Job
from .errors import RpcError
from .lifecycle import Lifecycle
from .outbox import ChunkStream, Outbox

if TYPE_CHECKING:
    from .engine import Engine
    from .settings import Settings

PROGRESS_INTERVAL_S = 0.05

T = TypeVar("T")


class ProgressReporter:
    """`$/progress` for one request: monotonic, rate-limited, and silent once closed (its
    response is on its way). Called from worker threads and the engine thread; the lock
    orders progress before the response and is only held to queue a line, never to write."""

    def __init__(self, token: Any, writer: Outbox) -> None:
        self._token = token
        self._writer = writer
        self._lock = threading.Lock()
        self._closed = token is None
        self._last_sent = 0.0
        self._last_phase: str | None = None
        self._completed = 0.0

    def __call__(self, phase: str, completed: float, total: float | None, unit: str,
                 message: str | None = None, **details: Any) -> None:
        """`details`: more fields of `$/progress` (a download's file, bytesPerSecond, etaSeconds);
        those that are None are left out. `completed` never decreases within a phase."""
        with self._lock:
            if self._closed or (phase == self._last_phase and completed < self._completed):
                return
            now = time.monotonic()
            final = total is not None and completed >= total
            if phase == self._last_phase and not final and now - self._last_sent < PROGRESS_INTERVAL_S:
                return
            self._completed, self._last_phase, self._last_sent = completed, phase, now
            params = {"token": self._token, "phase": phase, "completed": completed,
                      "total": total, "unit": unit}
            if message:
                params["message"] = message
            params.update((key, value) for key, value in details.items() if value is not None)
            self._writer.post(jsonrpc.notification("$/progress", params))

    def close(self) -> None:
        """No more progress: a report racing this either was queued before it or is dropped."""
        with self._lock:
            self._closed = True


def progress_token(params: Any) -> Any:
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta.get("progressToken") if isinstance(meta, dict) else None


class Server(Protocol):
    """What a request sees of its session."""

    settings: Settings
    engine: Engine
    writer: Outbox
    lifecycle: Lifecycle
    started_at: float

    async def shutdown(self, own_id: jsonrpc.RequestId) -> None: ...

    def inject_fault(self, name: str) -> None: ...


CancelledAnswer = Callable[["InFlightRequest", CancelReason], Any]
"""What a request answers when it is cancelled before its work could answer for itself:
a result, or it raises the RpcError to answer with."""


def cancel_error(request: InFlightRequest, reason: CancelReason) -> Any:
    """What most requests answer when cancelled: -32800 (the client), -32802 (the server),
    with what the request's method put in `cancelled_data`."""
    error = reason.error()
    error.data.update(request.cancelled_data)
    raise error


class InFlightRequest:
    def __init__(self, session: Server, call: jsonrpc.Call, received_at: float,
                 reply: Callable[[dict[str, Any]], None], when_cancelled: CancelledAnswer = cancel_error) -> None:
        self.session = session
        self.id = call.id
        self.method = call.method
        self.params = call.params  # as sent: the method checks them
        self.received_at = received_at  # perf_counter when its line was read
        self.progress = ProgressReporter(progress_token(call.params), session.writer)
        self.task: anyio.TaskHandle[None] | None = None  # the task that answers it, in its own cancel scope
        self.cancel_reason: CancelReason | None = None
        self.model: str | None = None  # once resolved: names the result of a generation cancelled early
        self.cancelled_data: dict[str, Any] = {}  # what its error adds to its data when cancelled early
        self.answered = False
        self._reply = reply
        self._when_cancelled = when_cancelled
        self._stop_work: Callable[[CancelReason], None] | None = None

    @property
    def engine(self) -> Engine:
        return self.session.engine

    @property
    def settings(self) -> Settings:
        return self.session.settings

    def open_stream(self) -> ChunkStream:
        """Where a streaming generation's `generate/chunk`s go."""
        return self.session.writer.open_stream(self.id)

    # ---- the answer ----------------------------------------------------------------------

    def respond(self, message: dict[str, Any]) -> None:
        """The one response; any later one (a cancel that raced the answer) is dropped."""
        if self.answered:
            return
        self.answered = True
        self.progress.close()
        self._reply(message)

    def respond_cancelled(self) -> None:
        """The answer of a request whose task ended before it answered: what its method
        answers when cancelled early."""
        reason = self.cancel_reason or CancelReason.EXIT
        try:
            message = jsonrpc.result_message(self.id, self._when_cancelled(self, reason))
        except RpcError as error:
            message = jsonrpc.error_message(self.id, error)
        self.respond(message)

    # ---- cancellation --------------------------------------------------------------------

    def cancel(self, reason: CancelReason) -> None:
        """By `$/cancelRequest`, shutdown or exit; the first reason given is the one answered."""
        if self.answered:
            return
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self._stop_work is not None:
            self._stop_work(self.cancel_reason)
        elif self.task is not None:
            self.task.cancel()

    async def outcome_of(self, job: Job[T], cancel: Callable[[Job[Any], CancelReason], None]) -> T:
        """The outcome of the engine work `job`. From now on cancelling the request calls
        `cancel(job, reason)` instead of ending its task: the work stops and answers for
        itself, so that the request is answered exactly once, by its work."""
        self._stop_work = lambda reason: cancel(job, reason)
        try:
            if self.cancel_reason is None:
                return await job.future
            # Cancelled on its way to the engine, and its task's cancel scope has not fired yet:
            # stopped at once, and its answer, which comes within a step, is the request's.
            cancel(job, self.cancel_reason)
            with anyio.CancelScope(shield=True):
                outcome = await job.future
            return outcome
        except anyio.get_cancelled_exc_class():  # the session is ending: its work ends too
            cancel(job, self.cancel_reason or CancelReason.EXIT)
            raise
        finally:
            self._stop_work = None
