"""One client session: lines in, lifecycle, batches, cancellation, responses out.

`Session.run` owns one anyio task group, and everything the session does in the background
runs in it and ends with it: reading lines (handed over by the reader thread), one task per
request (cancelled through its `InFlightRequest`), the parent watchdog, the stop
signals, preloading, and giving memory back. jsonrpcserver dispatches each single request to
its method (see methods); everything JSON-RPC says about batches, notifications and ids is
handled here, to the letter of the spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import jsonrpc, schema
from .engine import CancelReason, Engine
from .engine.memory import release_memory
from .errors import Busy, InvalidRequest, MessageTooLarge, MethodNotFound, RankLost, RpcError
from .inflight import InFlightRequest
from .lifecycle import Lifecycle
from .methods import METHODS, dispatch, when_cancelled
from .outbox import Outbox
from .settings import Settings
from .transport import InputGate, LineFramer, OversizedLine, start_line_reader
from .watchdog import watch_parent

log = logging.getLogger("localmlx.session")

READ_AHEAD_LINES = 64  # lines read but not yet dispatched; past it, stdin is not read
LARGE_LINE_BYTES = 1 << 20  # once the requests of lines this long are answered, memory is released
EXIT_GRACE_S = 1.5  # for work in flight to answer before the wire is closed
# Served whatever else is in flight: they are how a client regains control.
CONTROL_METHODS = ("initialize", "ping", "shutdown", "server/status")

Frame = tuple[bytes | OversizedLine, Callable[[], None], float]  # a line, its release, when it was read
Reply = Callable[[Any], None]  # a line's (or a batch member's) one answer; None for a notification


def _stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM; and SIGINT run by hand at a terminal (spawned, the client decides)."""
    by_hand = sys.stdin is not None and sys.stdin.isatty()
    return (signal.SIGTERM, signal.SIGINT) if by_hand else (signal.SIGTERM,)


class BatchAnswer:
    """A batch's responses, posted as one array, in the batch's order, once every member is
    answered (notifications have none; a batch of only notifications gets nothing)."""

    def __init__(self, size: int, reply: Reply) -> None:
        self._answers: list[Any] = [None] * size
        self._left = size
        self._reply = reply

    def add(self, index: int, message: Any) -> None:
        self._answers[index] = message
        self._left -= 1
        if not self._left:
            answers = [answer for answer in self._answers if answer is not None]
            self._reply(answers or None)


class Session:
    def __init__(self, settings: Settings, wire_fd: int, read_fd: int = 0, parent_pid: int | None = None,
                 stop_signals: tuple[signal.Signals, ...] | None = None) -> None:
        self.settings = settings
        self._parent_pid = os.getppid() if parent_pid is None else parent_pid
        self._stop_signals = _stop_signals() if stop_signals is None else stop_signals
        self.started_at = time.monotonic()
        self.lifecycle = Lifecycle()
        self._wire_fd = wire_fd
        self._read_fd = read_fd
        self._inflight: dict[jsonrpc.IdKey, InFlightRequest] = {}
        self._faults = {f for f in settings.inject_faults if f.startswith("method:")}
        self.exit_code: int | None = None
        self._large_lines = 0  # large lines whose requests are not all answered yet
        self._releasing = False
        self._release_again = False

    # ---- running -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._exit = anyio.Event()
        self._all_answered: anyio.Event | None = None  # set once exiting and every request is answered
        self.writer = Outbox(self._wire_fd, on_broken=functools.partial(_on_loop, loop, self._on_peer_gone),
                             stream_limit_bytes=self.settings.stream_buffer_bytes)
        try:
            self.engine = Engine(self.settings, loop, join_group=self._group_joiner(loop))
            self.writer.on_drain = self.engine.scheduler.poke
            self.engine.scheduler.hand_over_output = self.writer.hand_over
            async with anyio.create_task_group() as self._tasks:
                self._tasks.start_soon(self._read_lines, self._start_reader(loop))
                self._tasks.start_soon(watch_parent, self._parent_pid, self._on_peer_gone)
                await self._tasks.start(self._stop_on_signals)  # before "serving": a signal may follow it
                self._tasks.start_soon(self.engine.preload, self.settings.preload_models)
                log.info("serving (models dir %s)", self.settings.models_dir)
                await self._exit.wait()
                await self._wind_down()
                self._tasks.cancel_scope.cancel()
        finally:
            for request in list(self._inflight.values()):  # each still gets its one answer
                request.respond_cancelled()
            self.writer.close()
            if self.engine.group is not None:
                self.engine.group.close()  # no rank outlives rank 0
        return self.exit_code or 0

    def _group_joiner(self, loop: asyncio.AbstractEventLoop) -> Any:
        """With LOCALMLX_HOSTFILE, this sidecar is rank 0 of a group (imported only then)."""
        if self.settings.hostfile is None:
            return None
        from .distributed.runtime import joiner

        return joiner(self.settings, functools.partial(_on_loop, loop, self._rank_lost))

    def _rank_lost(self, info: Any) -> None:
        """A rank of the group is gone (or the ranks diverged): the group cannot compute any
        more. Every request in flight, and any that comes now, is answered -32019; then the
        sidecar exits (code 3) for its client to restart it, and the group with it. A rank-0
        engine thread waiting in a collective cannot be stopped: the exit does not wait for it."""
        error = RankLost(f"{info.message()}; the sidecar exits to re-form the group", rank=info.rank,
                         host=info.host, reason=info.reason)
        self.lifecycle.lost = error
        for request in list(self._inflight.values()):
            request.respond(jsonrpc.error_message(request.id, error))
        threading.Timer(EXIT_GRACE_S + 3.0, _exit_now, (3,)).start()  # if winding down waits on MLX
        self._finish(3)

    def _start_reader(self, loop: asyncio.AbstractEventLoop) -> MemoryObjectReceiveStream[Frame]:
        """Blocking reads stay on the reader thread; each line comes over to the loop (stamped
        with when it was read), and so does the end of input."""
        lines_in: MemoryObjectSendStream[Frame]
        lines_in, lines = anyio.create_memory_object_stream[Frame](math.inf)  # bounded by the gate

        def hand_over(frame: bytes | OversizedLine, release: Callable[[], None]) -> None:
            # Once the loop is closed this raises, and the reader stops.
            loop.call_soon_threadsafe(_send_or_drop, lines_in, (frame, release, time.perf_counter()))

        gate = InputGate(READ_AHEAD_LINES, self.settings.max_pending_bytes, self.writer)
        start_line_reader(self._read_fd, LineFramer(self.settings.max_line_bytes), gate, hand_over,
                          functools.partial(_on_loop, loop, lines_in.close))
        return lines

    async def _read_lines(self, lines: MemoryObjectReceiveStream[Frame]) -> None:
        async with lines:
            async for frame in lines:
                self._take(frame)
                with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                    while True:  # every line already handed over, in this turn of the loop
                        self._take(lines.receive_nowait())
        log.info("stdin closed: exiting")
        self._finish(0)

    def _take(self, frame: Frame) -> None:
        line, release, received_at = frame
        try:
            if self.exit_code is None:  # exiting: nothing more is read or answered
                self._answer_line(line, received_at)
        finally:
            release()  # its place in the input gate

    async def _stop_on_signals(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            with anyio.open_signal_receiver(*self._stop_signals) as received:
                task_status.started()
                async for signum in received:
                    self.terminate(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # no signal handlers on this platform or thread
            log.debug("serving without stop signals", exc_info=True)
            task_status.started()

    # ---- lines ---------------------------------------------------------------------------

    def _answer_line(self, frame: bytes | OversizedLine, received_at: float) -> None:
        """Every line gets its answer: at once, or once its requests are answered."""
        large = isinstance(frame, OversizedLine) or len(frame) >= LARGE_LINE_BYTES
        if large:
            self._large_lines += 1

        def reply(message: Any) -> None:
            if message is not None:
                self.writer.post(message)
            if large:
                self._large_line_answered()

        if isinstance(frame, OversizedLine):
            reply(jsonrpc.error_message(jsonrpc.peek_id(frame.head), MessageTooLarge(
                f"Message too large: lines are limited to {frame.limit} bytes", limit=frame.limit)))
            return
        try:
            message = jsonrpc.parse_json(frame)
        except RpcError as error:
            reply(jsonrpc.error_message(None, error))
            return
        if not isinstance(message, list):
            self._start(message, received_at, reply)
        elif not message:
            reply(jsonrpc.error_message(None, InvalidRequest("Invalid Request: empty batch")))
        else:
            batch = BatchAnswer(len(message), reply)
            for index, item in enumerate(message):
                self._start(item, received_at, functools.partial(batch.add, index))

    def _large_line_answered(self) -> None:
        """Once no large line is in the works, what they took is given back to the OS (a
        15 MiB prompt is held in several copies while it is checked), off the loop."""
        self._large_lines -= 1
        if self._large_lines:
            return
        if self._releasing:  # memory freed since it began may be missed: once more after
            self._release_again = True
            return
        self._releasing = True
        self._tasks.start_soon(self._release_memory)

    async def _release_memory(self) -> None:
        try:
            while True:
                self._release_again = False
                await anyio.to_thread.run_sync(release_memory)
                if not self._release_again:
                    return
        finally:
            self._releasing = False

    # ---- requests ------------------------------------------------------------------------

    def _start(self, message: Any, received_at: float, reply: Reply) -> None:
        """Classify one message and answer it: errors at once, a request on its own task."""
        try:
            call = jsonrpc.read_call(message)
        except jsonrpc.BadCall as error:
            reply(jsonrpc.error_message(error.id, error))
            return
        if call.is_notification:
            self._notification(call)
            reply(None)
            return
        key = jsonrpc.id_key(call.id)
        refusal = self._refusal(call, key)
        if refusal is not None:
            reply(jsonrpc.error_message(call.id, refusal))
            return

        def answered(response: dict[str, Any]) -> None:
            del self._inflight[key]
            reply(response)
            if not self._inflight and self._all_answered is not None:
                self._all_answered.set()

        request = InFlightRequest(self, call, received_at, answered, when_cancelled(call.method))
        self._inflight[key] = request
        request.task = self._tasks.start_soon(self._serve, request)

    def _refusal(self, call: jsonrpc.Call, key: jsonrpc.IdKey) -> RpcError | None:
        if key in self._inflight:
            return InvalidRequest("Invalid Request: this id is already in use by a request in flight", id=call.id)
        limit = self.settings.max_pending_requests
        if len(self._inflight) >= limit and call.method not in CONTROL_METHODS:
            return Busy(f"Busy: {limit} requests are already in flight", inFlight=len(self._inflight),
                        maxPendingRequests=limit)
        return None

    async def _serve(self, request: InFlightRequest) -> None:
        """The request's task: answered by its method, or, if its task ends first (it was
        cancelled, or the session is ending), answered as cancelled."""
        try:
            if request.cancel_reason is None:  # not cancelled before it could start
                request.respond(await self._response(request))
        finally:
            if not request.answered:
                request.respond_cancelled()

    async def _response(self, request: InFlightRequest) -> dict[str, Any]:
        refusal = self.lifecycle.refusal(request.method)
        if refusal is None and request.method not in METHODS:
            refusal = MethodNotFound(f"Method not found: {request.method}", method=request.method)
        if refusal is not None:
            return jsonrpc.error_message(request.id, refusal)
        return await dispatch(request)

    def inject_fault(self, name: str) -> None:
        """For tests of failure handling: raise, once, where LOCALMLX_INJECT_FAULTS names `name`."""
        if name in self._faults:
            self._faults.discard(name)
            raise RuntimeError(f"injected fault (LOCALMLX_INJECT_FAULTS={name}): details for the log only")

    # ---- notifications -------------------------------------------------------------------

    def _notification(self, call: jsonrpc.Call) -> None:
        """Never answered, whatever happens; problems go to the log."""
        try:
            if call.method == "$/cancelRequest":
                params = call.params if isinstance(call.params, dict) else {}
                exact = isinstance(params.get("id"), jsonrpc.JsonNumber)  # any number: valid
                schema.check("notifications", "$/cancelRequest", "params", dict(params, id=0) if exact else params)
                self.cancel(params["id"])
            elif call.method == "exit":
                self._finish(0 if self.lifecycle.shutdown_requested else 1)
            else:
                log.debug("ignoring notification %s", call.method)
        except RpcError as error:
            log.warning("bad %s notification: %s", call.method, error.message)

    def cancel(self, id_: jsonrpc.RequestId, reason: CancelReason = CancelReason.CLIENT) -> None:
        """Unknown or finished ids are ignored, as the spec says."""
        request = self._inflight.get(jsonrpc.id_key(id_))
        if request is not None:
            request.cancel(reason)

    # ---- shutdown and exit ---------------------------------------------------------------

    async def shutdown(self, own_id: jsonrpc.RequestId) -> None:
        self.lifecycle.shutting_down = True
        self.lifecycle.shutdown_requested = True
        self._cancel_all(CancelReason.SHUTDOWN, keep=jsonrpc.id_key(own_id))
        await self.engine.unload_all(CancelReason.SHUTDOWN)

    def _cancel_all(self, reason: CancelReason, keep: jsonrpc.IdKey | None = None) -> None:
        for key, request in list(self._inflight.items()):
            if key != keep:
                request.cancel(reason)

    def _on_peer_gone(self) -> None:
        self._finish(0)

    def terminate(self, signum: int) -> None:
        """SIGTERM (or SIGINT at a terminal): work in flight is answered -32802, then exit 0."""
        log.info("signal %d: stopping", signum)
        self._finish(0, CancelReason.SHUTDOWN)

    def _finish(self, code: int, reason: CancelReason = CancelReason.EXIT) -> None:
        if self.exit_code is not None:
            return
        self.exit_code = code
        self.lifecycle.shutting_down = True
        self._cancel_all(reason)
        self._exit.set()

    async def _wind_down(self) -> None:
        """Give running generations a moment to see their cancel flag and answer; whatever
        is still running after that is answered as cancelled when its task is."""
        deadline = anyio.current_time() + EXIT_GRACE_S
        await self.engine.close(EXIT_GRACE_S)
        self._all_answered = anyio.Event()
        if not self._inflight:
            self._all_answered.set()
        with anyio.move_on_after(max(0.05, deadline - anyio.current_time())):
            await self._all_answered.wait()


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """From another thread: `fn` runs on the loop, unless the session is over and the loop
    closed (then there is no one left to tell)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _exit_now(code: int) -> None:
    logging.shutdown()
    os._exit(code)


def _send_or_drop(stream: MemoryObjectSendStream[Frame], frame: Frame) -> None:
    """A line that arrives once the session has stopped reading is dropped."""
    try:
        stream.send_nowait(frame)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        frame[1]()
