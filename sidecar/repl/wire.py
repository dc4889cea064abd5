"""The REPL's end of the wire: the demo's SidecarClient, with three additions.

- Every message the sidecar writes is also queued, in order, for the one thread that
  draws the screen (the reader thread never prints).
- What is sent can be shown as it leaves (`/raw`).
- While the REPL waits for a reply, Ctrl-C does not raise: the first sends
  `$/cancelRequest` for the request in flight, a second stops waiting for it.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..client import Received, SidecarClient, SidecarExited
from ..jsonrpc import id_key

POLL_S = 0.02


@dataclass
class Reply:
    """How one exchange ended: the message that ended it, or none (nothing was
    expected, or the user stopped waiting)."""

    message: Any = None
    abandoned: bool = False


class CountingInterrupts:
    """While active (main thread only), Ctrl-C is counted rather than raised."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.count += 1

    def __enter__(self) -> "CountingInterrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class ReplClient(SidecarClient):
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.inbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()  # before the reader starts
        self.on_send: Callable[[bytes], None] | None = None
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
                 cancel: Callable[[], None] | None = None, linger_s: float | None = None) -> Reply:
        """Show each message as it arrives until `is_reply` accepts one. With `linger_s`,
        no reply is expected: show what arrives for that long. Ctrl-C: cancel, then abandon."""
        deadline = None if linger_s is None else time.monotonic() + linger_s
        cancelled = False
        with CountingInterrupts() as interrupts:
            while True:
                if interrupts.count and not cancelled and cancel is not None:
                    cancel()
                    cancelled = True
                if interrupts.count >= 2 or (interrupts.count and cancel is None):
                    return Reply(abandoned=True)
                try:
                    message = self.inbox.get(timeout=POLL_S)
                except queue.Empty:
                    if not self.alive:
                        raise SidecarExited(f"the sidecar exited (code {self.process.poll()})") from None
                    if deadline is not None and time.monotonic() > deadline:
                        return Reply()
                    continue
                show(message)
                if is_reply(message):
                    return Reply(message)

    def drain(self) -> list[Any]:
        """Messages that arrived while nobody was waiting (late replies, stray notifications)."""
        messages = []
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                return messages

    # ---- requests the REPL makes itself ------------------------------------------------------

    def forget(self, id_: Any) -> None:
        """Drop the client's record of a request whose reply the REPL has handled."""
        with contextlib.suppress(KeyError, TimeoutError, SidecarExited):
            self.wait_response(id_, 0)

    def abandon(self, id_: Any) -> None:
        self._abandoned.add(id_key(id_))

    def settle_late(self, message: Any) -> bool:
        """True when `message` is the late reply to an abandoned request (now forgotten)."""
        if not isinstance(message, dict) or "method" in message or "id" not in message:
            return False
        key = id_key(message["id"])
        if key not in self._abandoned:
            return False
        self._abandoned.discard(key)
        self.forget(message["id"])
        return True
