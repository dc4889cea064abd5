"""Ends the sidecar when the process that spawned it is gone, even if our stdin stays open
(another process may hold its write end): an orphan would otherwise hold its models in
memory for ever."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("localmlx.watchdog")

CHECK_EVERY_S = 0.25


def watch_parent(parent: int, on_gone: Callable[[], None]) -> threading.Thread | None:
    """Polls the parent pid (portable: Linux and macOS re-parent an orphan); None when the
    parent is init, which never goes away."""
    if parent <= 1:
        return None
    stopped = threading.Event()

    def run() -> None:
        while True:
            if os.getppid() != parent:
                log.warning("parent process %d is gone: exiting", parent)
                on_gone()
                return
            stopped.wait(CHECK_EVERY_S)

    thread = threading.Thread(target=run, name="parent-watchdog", daemon=True)
    thread.start()
    return thread
