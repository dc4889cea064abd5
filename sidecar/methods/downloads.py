"""models/download."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..inflight import InFlightRequest
from .table import rpc_method

T = TypeVar("T")


@rpc_method("models/download")
async def download_model(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    """A cancel answers -32800 at once; the transfer stops at its next read and what arrived
    stays, so the next download of the model resumes it."""
    from ..downloads import check_revision, pull  # here: the transfer code is not needed to start serving

    repo_id = params["model"]
    context.engine.locator.check_download_allowed(repo_id)
    revision = params.get("revision")
    if revision is not None:
        check_revision(revision)
    cancel = threading.Event()
    try:
        pulled = await _on_a_thread_of_its_own(
            lambda: pull(repo_id, revision, context.settings, context.progress, cancel))
    except asyncio.CancelledError:
        cancel.set()
        raise
    return pulled.to_wire()


async def _on_a_thread_of_its_own(work: Callable[[], T]) -> T:
    """Hours of network work: not on the shared worker threads that tokenize and resolve for
    generations, and a daemon, so the sidecar's exit never waits for a stalled transfer."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(set_outcome: Callable[[], None]) -> None:
        if not future.done():
            set_outcome()

    def run() -> None:
        try:
            set_outcome = functools.partial(future.set_result, work())
        except BaseException as exc:
            set_outcome = functools.partial(future.set_exception, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the sidecar is exiting
            loop.call_soon_threadsafe(settle, set_outcome)

    threading.Thread(target=run, daemon=True, name="localmlx-download").start()
    return await future
