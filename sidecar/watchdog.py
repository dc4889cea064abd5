"""Ends the sidecar when the process that spawned it is gone, even if our stdin stays open
(another process may hold its write end): an orphan would otherwise hold its models in
memory for ever."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import anyio

log = logging.getLogger("localmlx.watchdog")

CHECK_EVERY_S = 0.25


async def watch_parent(parent: int, on_gone: Callable[[], None]) -> None:
    """Polls the parent pid (portable: Linux and macOS re-parent an orphan); returns at once
    when the parent is init, which never goes away."""
    if parent <= 1:
        return
    while os.getppid() == parent:
        await anyio.sleep(CHECK_EVERY_S)
    log.warning("parent process %d is gone: exiting", parent)
    on_gone()
