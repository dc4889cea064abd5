"""models/download."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

from ..inflight import InFlightRequest
from .table import rpc_method


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


async def _on_a_thread_of_its_own(work: Callable[[], Any]) -> Any:
    """Hours of network work: not on the shared worker threads that tokenize and resolve for
    generations, and a daemon, so the sidecar's exit never waits for a stalled transfer."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome: Any, failed: bool) -> None:
        if not future.done():
            future.set_exception(outcome) if failed else future.set_result(outcome)

    def run() -> None:
        try:
            outcome, failed = work(), False
        except BaseException as exc:
            outcome, failed = exc, True
        try:
            loop.call_soon_threadsafe(settle, outcome, failed)
        except RuntimeError:  # the loop is closed: the sidecar is exiting
            pass

    threading.Thread(target=run, daemon=True, name="localmlx-download").start()
    return await future
