"""One client session: frames in, lifecycle, batches, cancellation, dispatch, responses out.

jsonrpcserver dispatches each single request to its method; everything JSON-RPC says about
batches, notifications and ids is handled here, to the letter of the spec.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from jsonrpcserver.async_dispatcher import dispatch_request
from jsonrpcserver.methods import Methods
from jsonrpcserver.request import Request
from oslash.either import Left

from . import jsonrpc, schema
from .jsonrpc import id_key
from .engine import CancelReason, Engine, GenerationRequest, GenerationResult, Job
from .engine.memory import release_memory
from .errors import (Busy, InternalError, InvalidRequest, MessageTooLarge, MethodNotFound,
                     NotInitialized, RequestCancelled, RpcError)
from .settings import Settings
from .outbox import Outbox
from .transport import InputGate, LineFramer, OversizedLine, start_line_reader

log = logging.getLogger("localmlx.session")

PROGRESS_INTERVAL_S = 0.05
READ_AHEAD_LINES = 64  # lines read but not yet dispatched; past it, stdin is not read
LARGE_LINE_BYTES = 1 << 20  # once the requests of lines this long are answered, memory is released
OFF_LOOP_VALUES = 4096  # params holding more values are checked off the loop (~10 µs a value)
# Served whatever else is in flight: they are how a client regains control.
CONTROL_METHODS = ("initialize", "ping", "shutdown", "server/status")
GENERATION_METHODS = ("generate", "chat")


class ProgressReporter:
    """`$/progress` for one request: monotonic, rate-limited, and silent once the
    response is on its way. Called from worker threads and the engine thread; the lock
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
            if self._closed or phase == self._last_phase and completed < self._completed:
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

    def close_then(self, send: Callable[[], None]) -> None:
        with self._lock:
            self._closed = True
            send()


@dataclass(eq=False)
class RequestContext:
    """What a method sees of its request: id, timing, progress, and the job it runs."""

    session: "Session"
    id: Any
    received_at: float
    method: str
    progress: ProgressReporter
    job: Job | None = None
    model: str | None = None  # once resolved: names the result of a generation cancelled early
    cancel_reason: CancelReason | None = None  # set by $/cancelRequest, shutdown or exit

    @property
    def engine(self) -> Engine:
        return self.session.engine

    @property
    def settings(self) -> Settings:
        return self.session.settings


@dataclass(eq=False)
class InFlight:
    context: RequestContext
    task: asyncio.Task | None = None


@dataclass
class Lifecycle:
    initialized: bool = False
    shutting_down: bool = False
    shutdown_requested: bool = False
    client_info: dict[str, Any] = field(default_factory=dict)


class Session:
    def __init__(self, settings: Settings, wire_fd: int, read_fd: int = 0, parent_pid: int | None = None) -> None:
        self.settings = settings
        self._parent_pid = os.getppid() if parent_pid is None else parent_pid
        self.started_at = time.monotonic()
        self.lifecycle = Lifecycle()
        self._wire_fd = wire_fd
        self._read_fd = read_fd
        self._inflight: dict[tuple[str, Any], InFlight] = {}
        self._tasks: set[asyncio.Task] = set()
        self._methods: Methods = {}
        self._faults = {f for f in settings.inject_faults if f.startswith("method:")}
        self.exit_code: int | None = None
        self._large_lines = 0  # large lines whose requests are not all answered yet
        self._releasing: asyncio.Task | None = None
        self._release_again = False

    # ---- running -------------------------------------------------------------------------

    async def run(self) -> int:
        from .methods import register_all

        self.loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        self.writer = Outbox(self._wire_fd, on_broken=self._from_thread(self._on_peer_gone),
                             stream_limit_bytes=self.settings.stream_buffer_bytes)
        self.engine = Engine(self.settings, self.loop)
        self.writer.on_drain = self.engine.scheduler.poke
        register_all(self._methods)
        gate = InputGate(READ_AHEAD_LINES, self.settings.max_pending_bytes, self.writer)
        start_line_reader(self._read_fd, LineFramer(self.settings.max_line_bytes), gate,
                          self._from_thread(self._on_frame, stamp=True),
                          self._from_thread(self._on_eof))
        self._watch_signals_and_parent()
        self.engine.preload(self.settings.preload_models)
        log.info("serving (models dir %s)", self.settings.models_dir)
        await self._exit.wait()
        return self.exit_code or 0

    def _from_thread(self, fn: Callable[..., None], stamp: bool = False) -> Callable[..., None]:
        def hop(*args: Any) -> None:
            if stamp:
                args = (*args, time.perf_counter())
            self.loop.call_soon_threadsafe(fn, *args)
        return hop

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- frames --------------------------------------------------------------------------

    def _on_frame(self, frame: bytes | OversizedLine, release: Callable[[], None], received_at: float) -> None:
        """One line read; `release` gives its place in the input gate back once dispatched."""
        try:
            if self.exit_code is None:  # exiting: nothing more is read or answered
                self._dispatch(frame, received_at)
        finally:
            release()

    def _dispatch(self, frame: bytes | OversizedLine, received_at: float) -> None:
        large = isinstance(frame, OversizedLine) or len(frame) >= LARGE_LINE_BYTES
        if large:
            self._large_lines += 1
        work = self._answer_frame(frame, received_at)
        if not large:
            return
        if work is None:
            self._large_line_answered()
        else:
            work.add_done_callback(lambda _: self._large_line_answered())

    def _answer_frame(self, frame: bytes | OversizedLine, received_at: float) -> asyncio.Task | None:
        """Answers at once, or returns the task that will."""
        if isinstance(frame, OversizedLine):
            error = MessageTooLarge(f"Message too large: lines are limited to {frame.limit} bytes",
                                    limit=frame.limit)
            self.writer.post(jsonrpc.error_message(jsonrpc.peek_id(frame.head), error))
            return None
        try:
            message = jsonrpc.parse_json(frame)
        except RpcError as error:
            self.writer.post(jsonrpc.error_message(None, error))
            return None
        if isinstance(message, list):
            if not message:
                self.writer.post(jsonrpc.error_message(None, InvalidRequest("Invalid Request: empty batch")))
                return None
            return self._spawn(self._answer_batch(message, received_at))
        return self._start(message, received_at, self._send_response)

    def _large_line_answered(self) -> None:
        self._large_lines -= 1
        self._release_memory_when_idle()

    def _release_memory_when_idle(self) -> None:
        """Once no large line is in the works, what they took is given back to the OS (a
        15 MiB prompt is held in several copies while it is checked), off the loop."""
        if self._large_lines:
            return
        if self._releasing is not None:  # memory freed since it began may be missed: once more after
            self._release_again = True
            return
        self._release_again = False
        self._releasing = self._spawn(asyncio.to_thread(release_memory))
        self._releasing.add_done_callback(self._released)

    def _released(self, _: asyncio.Task) -> None:
        self._releasing = None
        if self._release_again:
            self._release_memory_when_idle()

    def _send_response(self, response: dict[str, Any] | None, context: RequestContext | None) -> None:
        if response is None:
            return
        if context is None:
            self.writer.post(response)
        else:
            context.progress.close_then(lambda: self.writer.post(response))

    async def _answer_batch(self, messages: list[Any], received_at: float) -> None:
        done: list[asyncio.Future] = []
        for message in messages:
            future = self.loop.create_future()
            done.append(future)
            self._start(message, received_at,
                        lambda response, context, f=future: f.done() or f.set_result((response, context)))
        results = await asyncio.gather(*done)
        responses = [r for r, _ in results if r is not None]
        contexts = [c for _, c in results if c is not None]
        for context in contexts:
            context.progress.close_then(lambda: None)
        if responses:
            self.writer.post(responses)

    def _start(self, message: Any, received_at: float,
               reply: Callable[[dict[str, Any] | None, RequestContext | None], None]) -> asyncio.Task | None:
        """Classify one message and answer it: errors at once, requests on their own task
        (returned)."""
        try:
            call = jsonrpc.read_call(message)
        except jsonrpc.BadCall as error:
            reply(jsonrpc.error_message(error.id, error), None)
            return None
        if call.is_notification:
            self._notification(call)
            reply(None, None)
            return None
        key = id_key(call.id)
        if key in self._inflight:
            reply(jsonrpc.error_message(call.id, InvalidRequest(
                "Invalid Request: this id is already in use by a request in flight", id=call.id)), None)
            return None
        limit = self.settings.max_pending_requests
        if len(self._inflight) >= limit and call.method not in CONTROL_METHODS:
            reply(jsonrpc.error_message(call.id, Busy(
                f"Busy: {limit} requests are already in flight", inFlight=len(self._inflight),
                maxPendingRequests=limit)), None)
            return None
        meta = call.params.get("_meta") if isinstance(call.params, dict) else None
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        context = RequestContext(self, call.id, received_at, call.method, ProgressReporter(token, self.writer))
        inflight = InFlight(context)
        self._inflight[key] = inflight
        replied = False

        def send(response: dict[str, Any]) -> None:
            nonlocal replied
            if not replied:
                replied = True
                self._inflight.pop(key, None)
                reply(response, context)

        async def answer() -> None:
            try:
                result = await self._request(call, context)
                response = jsonrpc.result_message(call.id, result)
            except RpcError as error:
                response = jsonrpc.error_message(call.id, error)
            except Exception:  # a bug: keep serving; the traceback goes to stderr, never to the wire
                log.exception("internal error in %s", call.method)
                response = jsonrpc.error_message(call.id, InternalError("Internal error", method=call.method))
            send(response)

        def on_done(task: asyncio.Task) -> None:
            # A cancelled task, whether it had started or not, still owes its one response.
            if task.cancelled():
                send(self._cancelled_response(call, context))

        inflight.task = self._spawn(answer())
        inflight.task.add_done_callback(on_done)
        return inflight.task

    # ---- requests ------------------------------------------------------------------------

    async def _request(self, call: jsonrpc.Call, context: RequestContext) -> Any:
        lifecycle = self.lifecycle
        if call.method == "initialize" and lifecycle.initialized:
            raise InvalidRequest("Invalid Request: already initialized")
        if not lifecycle.initialized and call.method not in ("initialize", "ping"):
            raise NotInitialized("Server not initialized: send initialize first", method=call.method)
        if lifecycle.shutting_down and call.method not in ("ping", "shutdown"):
            raise InvalidRequest("Invalid Request: the server is shutting down", method=call.method)
        if call.method not in self._methods:
            raise MethodNotFound(f"Method not found: {call.method}", method=call.method)
        params = await self._checked_params(call)
        _, result = await dispatch_request(self._methods, context, Request(call.method, params, call.id))
        if isinstance(result, Left):
            # What the method raised, as it raised it (see methods.rpc_method). jsonrpcserver's own
            # refusals (no such method, params that do not bind) cannot happen after the checks above.
            raised = result._error.data
            raise raised if isinstance(raised, Exception) else RuntimeError(f"jsonrpcserver: {result._error}")
        return result._value.result

    async def _checked_params(self, call: jsonrpc.Call) -> dict[str, Any]:
        """Params checked against the schema: many of them (up to 0.7 s of checking) on a
        worker thread, so that the loop goes on serving the others meanwhile."""
        if call.params is not None and schema.check_size(call.params) > OFF_LOOP_VALUES:
            return await asyncio.to_thread(schema.check_params, call.method, call.params)
        return schema.check_params(call.method, call.params)

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

    def cancel(self, id_: Any, reason: CancelReason = CancelReason.CLIENT) -> None:
        """Running generations stop at their next step and answer with their usage; any
        other request (or a generation not yet handed to the engine) is answered at once."""
        inflight = self._inflight.get(id_key(id_))
        if inflight is None:
            return  # unknown or finished: ignored, as the spec says
        context = inflight.context
        context.cancel_reason = context.cancel_reason or reason
        if context.job is not None and context.job.kind == "generate":
            self.engine.cancel(context.job, context.cancel_reason)
        elif inflight.task is not None:
            inflight.task.cancel()  # a load or unload it awaited goes on in the background

    def _cancelled_response(self, call: jsonrpc.Call, context: RequestContext) -> dict[str, Any]:
        reason = context.cancel_reason or CancelReason.CLIENT
        if call.method in GENERATION_METHODS and reason is CancelReason.CLIENT:
            request = GenerationRequest(context.id, context.received_at, None, None, 0, None, [],
                                        stream=isinstance(call.params, dict) and bool(call.params.get("stream")))
            params = call.params if isinstance(call.params, dict) else {}
            model = context.model or params.get("model") or self.engine.default_model()
            result = GenerationResult.cancelled_before_start(str(model), request)
            return jsonrpc.result_message(call.id, result.to_wire())
        return jsonrpc.error_message(call.id, self._cancel_error(reason))

    @staticmethod
    def _cancel_error(reason: CancelReason) -> RpcError:
        from .errors import ServerCancelled

        if reason is CancelReason.CLIENT:
            return RequestCancelled("Request cancelled")
        return ServerCancelled(f"Cancelled by the server ({reason.value})", reason=reason.value)

    # ---- shutdown and exit ---------------------------------------------------------------

    async def shutdown(self, own_id: Any) -> None:
        self.lifecycle.shutting_down = True
        self.lifecycle.shutdown_requested = True
        self._cancel_all(CancelReason.SHUTDOWN, keep=id_key(own_id))
        await self.engine.unload_all(CancelReason.SHUTDOWN)

    def _cancel_all(self, reason: CancelReason, keep: tuple[str, Any] | None = None) -> None:
        for key in list(self._inflight):
            if key != keep:
                self.cancel(key[1], reason=reason)

    def _on_eof(self) -> None:
        log.info("stdin closed: exiting")
        self._finish(0)

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

    def _watch_signals_and_parent(self) -> None:
        import signal
        import sys

        from .watchdog import watch_parent

        watch_parent(self._parent_pid, self._from_thread(self._on_peer_gone))
        signals = [signal.SIGTERM]
        if sys.stdin is not None and sys.stdin.isatty():
            signals.append(signal.SIGINT)  # run by hand: Ctrl-C stops it; spawned, the client decides
        for signum in signals:
            try:
                self.loop.add_signal_handler(signum, self.terminate, signum)
            except (NotImplementedError, RuntimeError):  # no signal handlers on this platform
                pass

    async def close(self, grace_s: float = 1.5) -> None:
        """Give running generations a moment to see their cancel flag and answer, then
        flush the wire. Whatever is still running then is answered as cancelled."""
        deadline = time.monotonic() + grace_s
        await self.engine.close(grace_s)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(0.05, deadline - time.monotonic()))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)  # let the cancelled tasks post their answers
        self.writer.close()
