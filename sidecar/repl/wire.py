"""The REPL's end of the wire: the demo's SidecarClient, with three additions.

- Every message the sidecar writes is also queued, in order, for the one thread that
  draws the screen (the reader thread never prints).
- What is sent can be shown as it leaves (`/raw`).
- While the REPL waits for a reply, Ctrl-C does not raise: the first sends
  `$/cancelRequest` for the request in flight, a second stops waiting for it. Ctrl-D
  (seen by `keys`, on a terminal) cancels too, and the reply says the user wants to leave.
- The answer to a request the user stopped waiting for (its chunks, its late response) is
  never shown as part of another exchange: it goes to `on_late` (the /raw view) only.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..client import Received, SidecarClient, SidecarExited
from ..jsonrpc import id_key

POLL_S = 0.02


@dataclass
class Reply:
    """How one exchange ended: the message that ended it, or none (nothing was
    expected, or the user stopped waiting)."""

    message: Any = None
    abandoned: bool = False
    quit: bool = False  # Ctrl-D while waiting: leave once this exchange is settled


class CountingInterrupts:
    """While active (main thread only), Ctrl-C is counted rather than raised."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.count += 1

    def __enter__(self) -> CountingInterrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class ReplClient(SidecarClient):
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # before the reader starts
        self.on_send: Callable[[bytes], None] | None = None
        self.on_late: Callable[[Any], None] | None = None
        super().__init__(args, env=env)
        # A REPL session may run for hours: keep only recent history, not every token.
        self.received = collections.deque(self.received, maxlen=64)  # type: ignore[assignment]
        self.stderr_lines = collections.deque(self.stderr_lines, maxlen=500)  # type: ignore[assignment]
        self._abandoned: set[tuple[str, Any]] = set()

    def send_raw(self, data: bytes) -> None:
        if self.on_send is not None:
            self.on_send(data)
        super().send_raw(data)

    def _dispatch(self, item: Received) -> None:
        super()._dispatch(item)
        self.inbox.put(item.message)

    @property
    def alive(self) -> bool:
        """False once the sidecar's stdout has closed and every message is queued."""
        return self._reader.is_alive() or not self.inbox.empty()

    def wait_for(self, is_reply: Callable[[Any], bool], show: Callable[[Any], None],
                 cancel: Callable[[str], None] | None = None, linger_s: float | None = None,
                 keys: Any = None, on_wait: Callable[[], None] | None = None) -> Reply:
        """Show each message as it arrives until `is_reply` accepts one. With `linger_s`,
        no reply is expected: show what arrives for that long. Ctrl-C or Ctrl-D (`keys`, a
        context whose `poll()` counts Ctrl-Ds): `cancel("^C"|"^D")`, then a second abandons.
        `on_wait` runs once both are watched (a spinner: Ctrl-C when it shows cancels)."""
        deadline = None if linger_s is None else time.monotonic() + linger_s
        cancelled = False
        with CountingInterrupts() as interrupts, keys or contextlib.nullcontext():
            if on_wait is not None:
                on_wait()
            while True:
                eofs = keys.poll() if keys is not None else 0
                stops = interrupts.count + eofs
                if stops and not cancelled and cancel is not None:
                    cancel("^D" if eofs else "^C")
                    cancelled = True
                if stops >= 2 or (stops and cancel is None):
                    return Reply(abandoned=True, quit=bool(eofs))
                try:
                    message = self.inbox.get(timeout=POLL_S)
                except queue.Empty:
                    if not self.alive:
                        raise SidecarExited(f"the sidecar exited (code {self.process.poll()})") from None
                    if deadline is not None and time.monotonic() > deadline:
                        return Reply(quit=bool(eofs))
                    continue
                if self._late(message):
                    continue
                show(message)
                if is_reply(message):
                    return Reply(message, quit=bool(eofs))

    def drain(self) -> list[Any]:
        """Messages that arrived while nobody was waiting (stray notifications, responses),
        less the late answers to abandoned requests."""
        messages: list[Any] = []
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return messages
            if not self._late(message):
                messages.append(message)

    # ---- requests the REPL makes itself ------------------------------------------------------

    def forget(self, id_: Any) -> None:
        """Drop the client's record of a request whose reply the REPL has handled."""
        with contextlib.suppress(KeyError, TimeoutError, SidecarExited):
            self.wait_response(id_, 0)

    def abandon(self, id_: Any) -> None:
        self._abandoned.add(id_key(id_))

    def abandon_pending(self) -> None:
        """Ctrl-C outside a wait: cancel every request still unanswered, and ignore its reply."""
        with self._lock:
            keys = [key for key, pending in self._pending.items() if not pending.done.is_set()]
        for _, id_ in keys:
            self.cancel(id_)
            self.abandon(id_)

    def _late(self, message: Any) -> bool:
        """Is `message` part of the answer to an abandoned request (a chunk, or the response,
        after which the request is forgotten)? Such messages go to `on_late` only."""
        if not isinstance(message, dict):
            return False
        params = message.get("params")
        if "method" in message:
            key = _key(params.get("requestId")) \
                if message["method"] == "generate/chunk" and isinstance(params, dict) else None
        else:
            key = _key(message.get("id"))
        if key is None or key not in self._abandoned:
            return False
        if "method" not in message:
            self._abandoned.discard(key)
            self.forget(message["id"])
        if self.on_late is not None:
            self.on_late(message)
        return True


def _key(id_: Any) -> tuple[str, Any] | None:
    """`id_key` for what can be a request id (a string or a number), else None."""
    return id_key(id_) if isinstance(id_, (str, int, float)) and not isinstance(id_, bool) else None
