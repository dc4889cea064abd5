"""The engine operations rank 0 sends its followers, and a follower applying them.

A follower runs the same scheduler, lanes and generations as rank 0, on its shard, and
decides nothing: it loads, unloads, admits, cancels and steps exactly when rank 0 says, so
both run the same collectives in the same order. Everything a step depends on is in the
operations: a generation's request, its prompt tokens and its sampling seed (drawn once, on
rank 0, so sampled requests draw the same tokens everywhere); cancellations take effect at
the start of a turn, on every rank at the same point. Time-dependent decisions (keep-alive,
making room in memory, a slow reader) are taken on rank 0 alone and arrive as operations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from ..engine import gil_waits, operations
from ..engine.generation import GenerationOrder, prepare
from ..engine.jobs import CancelReason, Job
from ..engine.registry import ModelOptions, ModelRegistry
from ..engine.residency import Residency
from ..engine.scheduler import Scheduler
from ..hub import ModelLocation, no_progress
from ..settings import Settings

log = logging.getLogger("localmlx.follower")

class Replica:
    """A follower's engine: the scheduler's own lanes and registry, driven by rank 0's operations."""

    def __init__(self, settings: Settings, sharding: Any, loaded: Any = lambda name: None) -> None:
        self.settings = settings
        self.loaded = loaded  # tells rank 0 a load is done (its heartbeats may have paused)
        self.registry = ModelRegistry(settings)
        self.registry.sharding = sharding
        self.scheduler = Scheduler(settings, self.registry, on_start=lambda: None)
        self.scheduler.act_as_engine_thread()
        gil_waits.install()
        self.residency = Residency(settings, self.registry, self.scheduler)  # for unload; no mirror here
        self._loop = asyncio.new_event_loop()  # the jobs' futures: settled here, read by no one
        self._jobs: dict[int, Job[Any]] = {}

    def apply(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "turn":
            self.scheduler.settle_unstepped()
            self.scheduler.step(op["lanes"])
        elif kind == "admit":
            self._admit(op)
        elif kind == "cancel":
            job = self._jobs.get(op["seq"])
            if job is not None:
                self.scheduler.cancel(job, CancelReason(op["reason"]))
        elif kind == "load":
            self._load(op)
            self.loaded(op["name"])
        elif kind == "unload":
            self.residency.unload(op["name"], CancelReason(op["reason"]))
        elif kind == "options":
            loaded = self.registry.peek(op["name"])
            if loaded is not None:
                loaded.options = ModelOptions(**op["options"])
        else:
            raise ValueError(f"unknown operation {kind!r}")
        self._forget_finished()

    def _admit(self, op: dict[str, Any]) -> None:
        loaded = self.registry.peek(op["model"])
        if loaded is None:
            raise RuntimeError(f"admitted to {op['model']}, which this rank has not loaded")
        prepared = prepare(loaded, operations.request_of(op["request"], time.perf_counter()))
        if prepared.prompt != op["prompt"]:
            raise RuntimeError(f"the prompt of request {op['request']['request_id']!r} tokenizes differently on this rank")
        prepared.max_tokens, prepared.draw_seed = op["maxTokens"], op["drawSeed"]
        job = Job[Any]("generate", self._loop, model=loaded.name, payload=GenerationOrder(prepared, None))
        self._jobs[op["seq"]] = job
        self.scheduler.start_mirrored(job, loaded)

    def _load(self, op: dict[str, Any]) -> None:
        """At rank 0's path; where this host has no such files, the registry fetches the shard
        of the Hub repo instead."""
        path = Path(op["path"])
        location = ModelLocation(op["name"], "local-path", path, op.get("repo"))
        self.registry.load(location, path, ModelOptions(**op["options"]), no_progress)

    def _forget_finished(self) -> None:
        """Run the jobs' settle callbacks, and drop the jobs that are done."""
        self._loop.call_soon(self._loop.stop)
        self._loop.run_forever()
        for seq in [seq for seq, job in self._jobs.items() if job.future.done()]:
            del self._jobs[seq]

