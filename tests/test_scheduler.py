"""The Scheduler in this process: its own engine thread, real MLX and the demo model, jobs
submitted and awaited from the test's event loop as the engine does. Queueing, admission,
cancellation at each stage, unload, stop and keep-alive ownership, each in well under a
second."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from sidecar.engine.generation import GenerationOrder, GenerationRequest, GenerationResult, prepare
from sidecar.engine.jobs import CancelReason, Job
from sidecar.engine.registry import LoadedModel, ModelOptions, ModelRegistry
from sidecar.engine.sampling import SamplingParams
from sidecar.engine.scheduler import Scheduler
from sidecar.errors import Busy, RequestCancelled
from sidecar.hub import ModelLocator
from sidecar.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Engine:
    """The scheduler with a registry, and the few things Engine does around them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.registry = ModelRegistry(settings)
        self.scheduler = Scheduler(settings, self.registry, on_start=lambda: None)
        self.scheduler.start()

    async def control(self, kind: str, run: Any, model: str | None = None) -> Any:
        job = Job(kind, self.loop, model=model, run=run)
        self.scheduler.submit_control(job)
        return await job.future

    async def load_demo(self) -> LoadedModel:
        location = ModelLocator(self.settings).resolve("demo")
        return await self.control("load", lambda job: self.registry.load(
            location, location.path, ModelOptions(), lambda *_, **__: None), model="demo")

    def submit(self, loaded: LoadedModel, max_tokens: int, keep_alive: float | None = None) -> Job:
        request = GenerationRequest("r", time.perf_counter(), None, "The sea and the mountains", max_tokens,
                                    SamplingParams(temperature=0.0), [], stream=False, keep_alive=keep_alive)
        job = Job("generate", self.loop, model=loaded.name, payload=GenerationOrder(prepare(loaded, request), None),
                  keep_alive=keep_alive)
        self.scheduler.submit_generation(job)
        return job

    async def submit_running(self, loaded: LoadedModel, max_tokens: int) -> Job:
        """A generation that has sampled its first token (its prompt's last progress report)."""
        sampling = threading.Event()
        request = GenerationRequest("r", time.perf_counter(), None, "The sea and the mountains", max_tokens,
                                    SamplingParams(temperature=0.0), [], stream=False,
                                    progress=lambda phase, done, total, unit: done == total and sampling.set())
        job = Job("generate", self.loop, model=loaded.name, payload=GenerationOrder(prepare(loaded, request), None))
        self.scheduler.submit_generation(job)
        await anyio.to_thread.run_sync(sampling.wait, 10)
        return job


@pytest.fixture
async def engine(models_dir: Path) -> AsyncIterator[Engine]:
    engine = Engine(Settings(models_dir=models_dir, max_batch_size=1, max_queue=1))
    try:
        yield engine
    finally:
        engine.scheduler.stop(5)


async def test_cancelled_while_queued_it_is_answered_at_once_and_running_at_its_next_step(engine: Engine) -> None:
    with anyio.fail_after(30):
        loaded = await engine.load_demo()
        running = await engine.submit_running(loaded, 1000)
        queued = engine.submit(loaded, 5)  # one slot (maxBatchSize 1): it waits
        assert engine.scheduler.counts()["queued"] == 1
        engine.scheduler.cancel(queued, CancelReason.CLIENT)
        early: GenerationResult = await queued.future
        assert (early.finish_reason, early.completion_tokens, early.prompt_tokens) == ("cancelled", 0, 0)
        assert early.cancel_reason is CancelReason.CLIENT and early.text == ""
        assert not running.future.done()
        engine.scheduler.cancel(running, CancelReason.SHUTDOWN)
        engine.scheduler.cancel(running, CancelReason.CLIENT)  # the first reason stands
        stopped: GenerationResult = await running.future
        assert stopped.finish_reason == "cancelled" and stopped.cancel_reason is CancelReason.SHUTDOWN
        assert 0 < stopped.completion_tokens < 1000


async def test_past_its_queue_a_generation_is_busy(engine: Engine) -> None:
    with anyio.fail_after(30):
        loaded = await engine.load_demo()
        running = await engine.submit_running(loaded, 1000)
        queued = engine.submit(loaded, 5)
        with pytest.raises(Busy):
            engine.submit(loaded, 5)
        for job in (queued, running):
            engine.scheduler.cancel(job, CancelReason.CLIENT)
            assert (await job.future).finish_reason == "cancelled"


async def test_unloading_a_model_stops_its_work_with_reason_unload(engine: Engine) -> None:
    with anyio.fail_after(30):
        loaded = await engine.load_demo()
        running = await engine.submit_running(loaded, 1000)
        queued = engine.submit(loaded, 5)

        def unload(job: Job) -> bool:
            engine.scheduler.stop_model("demo", CancelReason.UNLOAD)
            return engine.registry.unload("demo")

        assert await engine.control("unload", unload, model="demo") is True
        results = [await job.future for job in (running, queued)]
        assert all(r.finish_reason == "cancelled" and r.cancel_reason is CancelReason.UNLOAD for r in results)
        assert results[0].completion_tokens > 0 and results[1].completion_tokens == 0
        assert engine.scheduler.models_with_work() == set()


async def test_control_work_queued_behind_a_load_can_be_cancelled_and_a_failure_reaches_its_caller(
        engine: Engine) -> None:
    with anyio.fail_after(30):
        entered, release = threading.Event(), threading.Event()
        first = Job("probe", engine.loop, run=lambda job: (entered.set(), release.wait(10)))
        second = Job("probe", engine.loop, run=lambda job: "never")
        engine.scheduler.submit_control(first)
        await anyio.to_thread.run_sync(entered.wait, 10)  # the engine thread is inside the first
        engine.scheduler.submit_control(second)
        engine.scheduler.cancel(second, CancelReason.CLIENT)
        with pytest.raises(RequestCancelled):
            await second.future
        release.set()
        await first.future

        def fails(job: Job) -> None:
            raise ValueError("broken")

        with pytest.raises(ValueError, match="broken"):
            await engine.control("probe", fails)


async def test_a_requests_keep_alive_becomes_its_models_when_its_work_starts(engine: Engine) -> None:
    with anyio.fail_after(30):
        loaded = await engine.load_demo()
        assert loaded.options.keep_alive == -1.0
        result: GenerationResult = await engine.submit(loaded, 3, keep_alive=30.0).future
        assert result.finish_reason in ("length", "stop") and loaded.options.keep_alive == 30.0


async def test_stopping_ends_running_and_waiting_work_with_reason_exit(engine: Engine) -> None:
    with anyio.fail_after(30):
        loaded = await engine.load_demo()
        running = await engine.submit_running(loaded, 1000)
        queued = engine.submit(loaded, 5)
        await anyio.to_thread.run_sync(engine.scheduler.stop, 5)
        results = [await job.future for job in (running, queued)]
        assert all(r.cancel_reason is CancelReason.EXIT for r in results)
        assert results[0].completion_tokens > 0
