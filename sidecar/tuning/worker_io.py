"""The child side of a tuning worker (see workers.py): its spec arrives as one JSON line on
stdin, its events leave as JSON lines on a private copy of its stdout, and it dies with the
sidecar.

Whatever else the worker's libraries print on stdout (mlx-lm's training UI) goes to stderr,
the sidecar's log, since file descriptor 1 is pointed there before any of them is imported.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import orjson


class Cancelled(Exception):
    """The sidecar asked the worker to stop (SIGTERM)."""


class WorkerIO:
    def __init__(self) -> None:
        self._events = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.spec: dict[str, Any] = orjson.loads(sys.stdin.buffer.readline())
        self.stop_requested = threading.Event()
        self.interruptible = True  # a SIGTERM raises at once (until a loop checks the flag itself)
        signal.signal(signal.SIGTERM, self._on_term)
        threading.Thread(target=self._exit_with_parent, name="parent-watch", daemon=True).start()

    def _on_term(self, *_: Any) -> None:
        self.stop_requested.set()
        if self.interruptible:
            raise Cancelled

    @staticmethod
    def _exit_with_parent() -> None:
        """The sidecar holds our stdin open while it wants us: EOF means it is gone."""
        sys.stdin.buffer.read()
        os._exit(70)

    def send(self, event: str, **fields: Any) -> None:
        self._events.write(orjson.dumps(dict(fields, event=event), option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def fail(self, code: int, message: str, **data: Any) -> None:
        self.send("error", code=code, message=message, data=data)
