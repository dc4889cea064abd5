"""A small synchronous Python client: spawns the sidecar as a child and talks NDJSON to it.

Used by `localmlx demo`, the REPL, the benchmarks and the tests: the same process boundary
and protocol that Wooster's TypeScript client uses. Besides the raw calls (`request`,
`stream`), `generation` streams a `chat`/`generate` and puts its channels back together
(text, reasoning, tool calls: see `Channels`), and `embed` returns vectors.
"""

from __future__ import annotations

import itertools
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import RpcError
from .jsonrpc import id_key, parse_json
from .protocol_defs import PROTOCOL_VERSION
from .transport import LineFramer, OversizedLine, encode_message


class RpcCallError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.message = error.get("message")
        self.data = error.get("data")


class SidecarExited(Exception):
    pass


def sidecar_command(python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "sidecar", "serve"]


@dataclass
class Received:
    """Every line the sidecar wrote, with the time it was read (perf_counter)."""

    message: Any
    at: float
    line: bytes = b""  # as read, for tests of exact bytes


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    response: dict[str, Any] | None = None
    chunks: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)  # Received, then _DONE

    def finish(self) -> None:
        self.done.set()
        self.chunks.put(_DONE)


_DONE = object()


@dataclass
class Channels:
    """A streamed `chat`/`generate` put back together from its `generate/chunk`s: the answer
    `text`, the `reasoning` (never part of the text) and the `tool_calls` by index."""

    text: str = ""
    reasoning: str = ""
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, chunk: dict[str, Any]) -> None:
        """One chunk's params, in `seq` order (as `SidecarClient.stream` yields them)."""
        self.reasoning += chunk.get("reasoning") or ""
        self.text += chunk.get("text") or ""
        for call in chunk.get("toolCalls") or ():
            self.tool_calls[call["index"]] = call

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The tool calls in OpenAI's shape (`index` dropped), in order; `error` when invalid."""
        return [{k: v for k, v in call.items() if k != "index"}
                for _, call in sorted(self.tool_calls.items())]

    def result(self, result: dict[str, Any]) -> dict[str, Any]:
        """The response's result with `text`, and `reasoning`/`toolCalls` when there were any,
        as an unstreamed request would have them."""
        whole = {**result, "text": self.text}
        if self.reasoning or result.get("reasoning"):
            whole["reasoning"] = self.reasoning or result["reasoning"]
        if self.tool_calls or result.get("toolCalls"):
            whole["toolCalls"] = self.calls or result["toolCalls"]
        return whole


class SidecarClient:
    def __init__(self, args: list[str] | None = None, env: dict[str, str] | None = None,
                 on_notification: Callable[[dict[str, Any]], None] | None = None,
                 stderr: int | None = None, preexec_fn: Callable[[], None] | None = None) -> None:
        self.process = subprocess.Popen(
            args or sidecar_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=stderr if stderr is not None else subprocess.PIPE,
            env={**os.environ, **(env or {})}, start_new_session=True, preexec_fn=preexec_fn)
        self._ids = itertools.count(1)
        self._pending: dict[Any, _Pending] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.on_notification = on_notification
        self.received: list[Received] = []  # the whole transcript, for tests
        self.stderr_lines: list[str] = []
        self.junk: list[bytes] = []  # stdout lines that were not JSON
        self._reading = threading.Event()  # cleared: the reader stops reading stdout (tests of back-pressure)
        self._reading.set()
        self._reader = threading.Thread(target=self._read, daemon=True, name="sidecar-reader")
        self._reader.start()
        if self.process.stderr is not None:
            threading.Thread(target=self._drain_stderr, daemon=True, name="sidecar-stderr").start()

    # ---- wire ------------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        self.send_raw(encode_message(message))

    def send_raw(self, data: bytes) -> None:
        with self._write_lock:
            assert self.process.stdin is not None
            self.process.stdin.write(data)
            self.process.stdin.flush()

    def _read(self) -> None:
        framer = LineFramer(1 << 30)
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while True:
            self._reading.wait()
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:  # our end was closed: same as EOF
                chunk = b""
            if not chunk:
                break
            now = time.perf_counter()
            for line in framer.feed(chunk):
                if isinstance(line, OversizedLine):
                    self.junk.append(line.head)
                    continue
                try:
                    message = parse_json(line, exact_ids=False)
                except RpcError:  # not protocol: recorded, so tests can insist there is none
                    self.junk.append(line)
                    continue
                self._dispatch(Received(message, now, line))
        with self._lock:
            for pending in self._pending.values():
                pending.finish()

    def pause_reading(self) -> None:
        """Stop reading stdout (after the read in progress): the sidecar's writes then block."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 60.0) -> list[str]:
        """Waits until `count` stderr lines contain `text`; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in list(self.stderr_lines) if text in line]
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise TimeoutError(f"{len(lines)} of {count} stderr lines with {text!r}")
            time.sleep(0.01)

    def _dispatch(self, item: Received) -> None:
        self.received.append(item)
        message = item.message
        if isinstance(message, dict) and "method" in message:
            params = message.get("params") or {}
            if message["method"] == "generate/chunk":
                with self._lock:
                    pending = self._pending.get(id_key(params.get("requestId")))
                if pending is not None:
                    pending.chunks.put(item)
            if self.on_notification is not None:
                self.on_notification(message)
            return
        if isinstance(message, dict) and "id" in message:
            with self._lock:
                pending = self._pending.get(id_key(message["id"]))
            if pending is not None:
                pending.response = message
                pending.finish()

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    # ---- calls -----------------------------------------------------------------------------

    def start_request(self, method: str, params: dict[str, Any] | None = None, id: Any = None) -> Any:
        id_ = next(self._ids) if id is None else id
        with self._lock:
            self._pending[id_key(id_)] = _Pending()
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return id_

    def wait_response(self, id_: Any, timeout: float = 120.0) -> dict[str, Any]:
        with self._lock:
            pending = self._pending[id_key(id_)]
        if not pending.done.wait(timeout):
            raise TimeoutError(f"no response to request {id_!r} within {timeout}s")
        if pending.response is None:
            raise SidecarExited(f"sidecar exited (code {self.process.poll()}) before answering {id_!r}")
        with self._lock:
            self._pending.pop(id_key(id_), None)
        return pending.response

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 120.0) -> dict[str, Any]:
        """The whole response message."""
        return self.wait_response(self.start_request(method, params), timeout)

    def request(self, method: str, params: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        """The result, or RpcCallError."""
        response = self.call(method, params, timeout)
        if "error" in response:
            raise RpcCallError(response["error"])
        return response["result"]

    def stream(self, method: str, params: dict[str, Any], timeout: float = 120.0,
               id: Any = None) -> Iterator[dict[str, Any]]:
        """Yields chunk params as they arrive; the final item is the response message."""
        id_ = self.start_request(method, dict(params, stream=True), id=id)
        with self._lock:
            pending = self._pending[id_key(id_)]
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = pending.chunks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"stream {id_!r} timed out") from None
            if item is _DONE:  # queued after the last chunk: the response (or EOF) came
                yield self.wait_response(id_, 0)
                return
            yield item.message["params"]

    def generation(self, method: str, params: dict[str, Any], timeout: float = 120.0,
                   on_chunk: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Streams a `chat` or `generate` (each chunk's params to `on_chunk`) and returns its
        result with the channels put back together: `text`, `reasoning`, `toolCalls`.
        Raises RpcCallError when it fails."""
        channels = Channels()
        for item in self.stream(method, params, timeout):
            if "requestId" in item:
                channels.add(item)
                if on_chunk is not None:
                    on_chunk(item)
            elif "error" in item:
                raise RpcCallError(item["error"])
            elif "result" in item:
                return channels.result(item["result"])
        raise SidecarExited(f"sidecar exited (code {self.process.poll()}) during {method}")

    def embed(self, input: str | list[str], timeout: float = 120.0, **params: Any) -> dict[str, Any]:
        """`embed`: {model, vectors, dimensions, usage, timings} for one text or several
        (`model`, `dimensions`, `normalize`, `keepAlive` as keyword arguments)."""
        result: dict[str, Any] = self.request(
            "embed", {**params, "input": [input] if isinstance(input, str) else list(input)}, timeout)
        return result

    def cancel(self, id_: Any) -> None:
        self.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": id_}})

    def initialize(self, **client_info: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request("initialize", {
            "protocolVersion": PROTOCOL_VERSION, "clientInfo": client_info or {"name": "localmlx-py"}})
        return result

    # ---- lifetime --------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> int:
        """shutdown -> exit -> wait; then SIGTERM, then SIGKILL. Always reaps the child."""
        if self.process.poll() is None:
            try:
                self.request("shutdown", timeout=timeout)
                self.send({"jsonrpc": "2.0", "method": "exit"})
            except (OSError, RpcCallError, TimeoutError, SidecarExited):
                pass
        return self.wait_or_kill(timeout)

    def wait_or_kill(self, timeout: float = 10.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
        try:
            return self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
