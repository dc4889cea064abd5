"""The sidecar side of a tuning worker: a child process that trains or fuses, so that the
engine keeps serving meanwhile and a crash or an out-of-memory kill there cannot take the
sidecar down. It gets its spec on stdin (held open: the worker exits when it closes), and
reports JSON events on its stdout; its stderr is ours (the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson

log = logging.getLogger("localmlx.tuning")

STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL
MAX_EVENT_BYTES = 1 << 20


class Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, task: str, spec: dict[str, Any], blas: str) -> Worker:
        spec = dict(spec, task=task, blas=blas)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar.tuning.worker", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=None, start_new_session=True, limit=MAX_EVENT_BYTES)
        assert process.stdin is not None
        process.stdin.write(orjson.dumps(spec) + b"\n")
        await process.stdin.drain()
        log.info("started the %s worker (pid %d)", task, process.pid)
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Its events until it closes its stdout (it has ended, or is about to)."""
        stdout = self.process.stdout
        assert stdout is not None
        while line := await stdout.readline():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("worker %d wrote a line that is not an event", self.pid)
                continue
            if isinstance(event, dict):
                yield event

    async def wait(self) -> int:
        return await self.process.wait()

    async def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM (it stops at its next safe point), then SIGKILL when it does not end in time."""
        if self.process.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.process.wait()), grace_s)
            except TimeoutError:
                log.warning("worker %d did not stop in %g s: killing it", self.pid, grace_s)
                self._signal(signal.SIGKILL)
        code = await self.process.wait()
        self.close()
        return code

    def _signal(self, signum: int) -> None:
        """os.kill, not Process.send_signal: that polls the child first, and a poll reaps a child
        that has just died (killed by the OOM killer, say), stealing its status from asyncio's
        watcher, which then reports 255 instead of the signal. A dead child keeps its pid until the
        watcher reaps it, so only in the instant between that and the loop hearing of it could
        the pid be another process's."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def close(self) -> None:
        """Close its stdin: a worker still running exits when it sees that."""
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
