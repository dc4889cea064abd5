"""The one thread that owns all MLX work, and its scheduler loop.

Each turn of the loop: run queued control work (load, unload) in order; admit waiting
generations into their model's lane; then advance every lane that has work by one step,
round robin, so several models share the thread fairly and a new request never waits for
another to finish; then run one micro-batch of one embed request (round robin too), so a big
embedding batch and streaming generations take turns. The loop sleeps on a condition when there is nothing to do: no polling.
After a step it waits, GIL released, for a sleeping writer to take the step's chunks
(`hand_over_output`): otherwise the writer would wait for the GIL while the next step is built.

The event loop only submits jobs, asks for cancellation, and awaits futures.

On rank 0 of a group (`mirror` set) every decision that touches a sharded model is also sent
to the followers as an operation, which they replay with this same code (sidecar.distributed):
admissions, the lanes each turn steps, and cancellations, which then take effect at the start
of a turn rather than mid-step, so that every rank sees them at the same point.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..embeddings.work import EmbeddingWork
from ..errors import Busy, InternalError, OutOfMemory, RpcError
from ..settings import Settings
from . import operations
from .generation import Generation, GenerationOrder, GenerationResult
from .jobs import CancelReason, Job
from .lanes import BatchLane, SoloLane
from .memory import active_bytes, is_out_of_memory
from .operations import Mirror
from .registry import LoadedModel, ModelRegistry
from .response_cache import CachedResponse, response_key
from .sampling import reset_global_random_state

log = logging.getLogger("localmlx.engine")

Lane = BatchLane | SoloLane
GenerationJob = Job[GenerationResult]
EmbedJob = Job[dict[str, Any]]  # its outcome is the embed result, but for totalMs
Queued = TypeVar("Queued", bound=Job[Any])


class Scheduler:
    def __init__(self, settings: Settings, registry: ModelRegistry,
                 on_start: Callable[[], None]) -> None:
        self.settings = settings
        self.registry = registry
        self._on_start = on_start
        self._ready = threading.Condition()
        self._control: collections.deque[Job[Any]] = collections.deque()
        self._waiting: collections.deque[GenerationJob] = collections.deque()  # generations not yet admitted
        self._lanes: dict[str, Lane] = {}
        self._embeds: collections.deque[EmbedJob] = collections.deque()  # embed requests, one micro-batch a turn
        self._turn = 0
        self._poked = False
        self._stopping = False
        self._started = False
        self._faults = set(settings.inject_faults)
        self.housekeeping: Callable[[], float | None] | None = None  # keep-alive expiry, set by the engine
        self.hand_over_output: Callable[[], None] | None = None  # after a step: the writer takes its chunks now
        self.running_control: Job[Any] | None = None
        self.mirror: Mirror | None = None  # rank 0 of a group: the followers
        self._deferred_cancels: list[tuple[Job[Any], CancelReason]] = []  # mirrored: applied at a turn's start
        self._admitted = 0  # mirrored generations so far: their sequence numbers
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._engine_ident: int | None = None

    def start(self) -> None:
        self._thread.start()

    def act_as_engine_thread(self) -> None:
        """A follower drives this scheduler from its own main thread, without `start`."""
        self._engine_ident = threading.get_ident()

    # ---- from the event loop ---------------------------------------------------------------

    def submit_control(self, job: Job[Any]) -> None:
        with self._ready:
            self._control.append(job)
            self._ready.notify()

    def submit_generation(self, job: GenerationJob) -> None:
        self._enqueue(job, self._waiting, "requests")

    def submit_embedding(self, job: EmbedJob) -> None:
        self._enqueue(job, self._embeds, "embed requests")

    def _enqueue(self, job: Queued, queue: collections.deque[Queued], what: str) -> None:
        with self._ready:
            if len(queue) >= self.settings.max_queue:
                raise Busy(f"Busy: {len(queue)} {what} already queued", queued=len(queue),
                           maxQueue=self.settings.max_queue)
            queue.append(job)
            self._ready.notify()

    def cancel(self, job: Job[Any], reason: CancelReason) -> None:
        """Work not started is answered at once; running work stops at its next step (on a
        group, at the start of the next turn, on every rank at once)."""
        with self._ready:
            if job.mirror_seq is not None and threading.get_ident() != self._engine_ident:
                self._deferred_cancels.append((job, reason))
                self._poked = True
                self._ready.notify()
                return
            if job.cancel_reason is None:
                job.cancel_reason = reason
            if job in self._waiting:
                self._waiting.remove(job)
                job.settle(_cancelled_before_start(job, reason))
            elif job in self._embeds:  # between micro-batches (the running one checks after its step)
                self._embeds.remove(job)
                _log_embed_stopped(job, reason)
                job.fail(reason.error())
            elif job in self._control:
                self._control.remove(job)
                job.fail(reason.error())
            self._poked = True
            self._ready.notify()

    def poke(self) -> None:
        """Something outside changed (a stream was read): look again."""
        with self._ready:
            self._poked = True
            self._ready.notify()

    def stop(self, timeout: float) -> None:
        """Running generations end at their next step; waits for that only if there are any
        (a thread still importing MLX has nothing to finish)."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
            busy = self._started and (self.running_control is not None or any(
                lane.active for lane in self._lanes.values()))
        if busy:
            self._thread.join(timeout)

    # ---- counters (read from any thread) -----------------------------------------------------

    def counts(self) -> dict[str, int]:
        lanes = list(self._lanes.values())
        return {"active": sum(lane.active for lane in lanes) + (self.running_control is not None) + len(self._embeds),
                "queued": len(self._waiting) + len(self._control),
                "paused": sum(lane.paused for lane in lanes)}

    def is_queued_or_running(self, kind: str, model: str) -> bool:
        jobs = [self.running_control, *list(self._control)]
        return any(j is not None and j.kind == kind and j.model == model for j in jobs)

    def models_with_work(self) -> set[str]:
        """Models with generations admitted or waiting, or a load or unload queued."""
        busy = {name for name, lane in list(self._lanes.items()) if lane.active}
        busy.update(job.model for job in [*list(self._waiting), *list(self._control), *list(self._embeds)]
                    if job.model)
        return busy

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        self._engine_ident = threading.get_ident()
        self._on_start()
        self._started = True
        wake_in: float | None = None
        while True:
            with self._ready:
                if not self._stopping and not self._has_work():
                    self._ready.wait(wake_in)  # a keep-alive may run out: wake for it
                if self._stopping:
                    break
                self._poked = False
                control = list(self._control)
                self._control.clear()
                cancels, self._deferred_cancels = self._deferred_cancels, []
            for job, reason in cancels:
                self._cancel_mirrored(job, reason)
            for job in control:
                self._run_control(job)
            wake_in = self.housekeeping() if self.housekeeping is not None else None
            self._admit()
            settled = self.settle_unstepped()
            lanes = self._lanes_with_work()
            if self.mirror is not None and (settled or lanes):
                self.mirror.send(operations.turn(lanes))
            self.step(lanes)
            if lanes and self.hand_over_output is not None:
                self.hand_over_output()
            self._step_embedding()
        self._stop_everything(CancelReason.EXIT)

    def _has_work(self) -> bool:
        return bool(self._control or self._poked or self._embeds or self._deferred_cancels or self._admissible()
                    or any(lane.has_work for lane in self._lanes.values()))

    def _admissible(self) -> bool:
        for job in self._waiting:
            lane = self._lanes.get(job.model)
            if lane is None or lane.free_slots > 0:
                return True
        return False

    def _run_control(self, job: Job[Any]) -> None:
        self.running_control = job
        error: BaseException | None = None
        try:
            assert job.run is not None  # control work is a function to run
            outcome = job.run(job)
        except BaseException as exc:  # delivered to the awaiting request
            error = exc
        finally:
            self.running_control = None
        if error is not None:
            job.fail(error)
        else:
            job.settle(outcome)

    def _admit(self) -> None:
        """Move waiting generations into their lanes, in arrival order, while slots last."""
        with self._ready:
            waiting = list(self._waiting)
        for job in waiting:
            loaded = self.registry.get(job.model)
            lane = self._lane_for(job.model, loaded) if loaded is not None else None
            if lane is not None and lane.free_slots <= 0:
                continue
            with self._ready:
                if job not in self._waiting:
                    continue  # cancelled meanwhile: already answered
                self._waiting.remove(job)
            if loaded is None or lane is None:  # unloaded while it was prepared: as its work would be
                job.settle(_cancelled_before_start(job, CancelReason.UNLOAD))
                continue
            self._start_generation(job, loaded, lane)

    def _lane_for(self, name: str, loaded: LoadedModel) -> Lane:
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = self._open_lane(loaded)
        return lane

    def _open_lane(self, loaded: LoadedModel) -> Lane:
        settings = self.settings
        if loaded.batchable and settings.batching:
            return BatchLane(loaded, settings.max_batch_size, settings.prefill_step_size)
        return SoloLane(loaded, settings.max_batch_size, settings.prefill_step_size)

    def _cancel_mirrored(self, job: Job[Any], reason: CancelReason) -> None:
        if job.cancel_reason is None:
            job.cancel_reason = reason
        if self.mirror is not None and job.mirror_seq is not None:
            self.mirror.send(operations.cancel(job.mirror_seq, reason))

    def start_mirrored(self, job: GenerationJob, loaded: LoadedModel) -> None:
        """A follower: admit the generation rank 0 admitted, into its model's lane."""
        self._start_generation(job, loaded, self._lane_for(loaded.name, loaded))

    def _start_generation(self, job: GenerationJob, loaded: LoadedModel, lane: Lane) -> None:
        order = _order(job)
        _adopt_keep_alive(job, loaded)
        if self.mirror is not None and loaded.sharded:
            self._admitted += 1
            job.mirror_seq = self._admitted
            self.mirror.send(operations.admit(job.mirror_seq, loaded.name, order.prepared))
        try:
            generation = Generation(job, loaded, order.prepared, order.stream)
            for fault, processor in (("generation", _injected_fault), ("freeze", _injected_freeze)):
                if fault in self._faults:  # a test asked for a failure inside mlx-lm
                    self._faults.discard(fault)
                    generation.logits_processors.append(processor)
            generation.admitted_at = time.perf_counter()
            lane.admit(generation)
        except Exception as exc:
            log.exception("could not start a generation on %s", loaded.name)
            job.fail(_engine_error(exc, loaded.name, order.request.method))

    def settle_unstepped(self) -> bool:
        """Cancelled work no step will see, and parked work whose client caught up; whether
        there was any."""
        settled = False
        for lane in self._lanes.values():
            for generation in lane.take_cancelled():
                self._finish(generation)
                settled = True
            lane.resume_drained()  # never on a sharded model: its generations are not paused
        return settled

    def _lanes_with_work(self) -> list[str]:
        """The lanes to step this turn, in order: a fair start each turn."""
        names = list(self._lanes)
        if not names:
            return []
        self._turn = (self._turn + 1) % len(names)
        return [name for name in names[self._turn:] + names[: self._turn] if self._lanes[name].has_work]

    def step(self, names: list[str]) -> None:
        for name in names:
            lane = self._lanes.get(name)
            if lane is None:
                continue
            try:
                finished = lane.step()
            except Exception as exc:
                self._fail_lane(name, exc)
                continue
            memory = active_bytes()
            for generation in lane.generations():
                generation.peak_memory = max(generation.peak_memory, memory)
            for generation in finished:
                generation.peak_memory = max(generation.peak_memory, memory)
                self._finish(generation)

    def _step_embedding(self) -> None:
        """One micro-batch of the embed request whose turn it is; it goes to the back of the queue."""
        with self._ready:
            if not self._embeds:
                return
            job = self._embeds.popleft()
        work = _work(job)
        try:
            if job.cancel_reason is not None:
                raise job.cancel_reason.error()
            loaded = self.registry.peek(job.model)
            if loaded is None or loaded is not work.loaded:  # unloaded since it was prepared
                raise CancelReason.UNLOAD.error()
            if work.started_at is None:
                _adopt_keep_alive(job, loaded)
            done = work.step()
            if job.cancel_reason is not None:
                raise job.cancel_reason.error()
        except Exception as exc:
            if job.cancelled:
                _log_embed_stopped(job, job.cancel_reason)
            elif not isinstance(exc, RpcError):
                log.error("embedding on %s failed: %s", job.model, exc, exc_info=not is_out_of_memory(exc))
            job.fail(_engine_error(exc, job.model, "embed"))
            return
        if done:
            loaded.touch()
            job.settle(work.result(job.queued_at))
            return
        with self._ready:
            self._embeds.append(job)

    def _finish(self, generation: Generation) -> None:
        generation.loaded.touch()  # its keep-alive counts from the end of its last reply
        result = generation.result()
        recording = generation.recording
        cache = generation.loaded.response_cache
        if recording is not None and cache is not None and (key := response_key(generation.request)) is not None:
            cache.put(key, CachedResponse(tuple(recording), result.finish_reason,
                                          result.prompt_tokens, result.completion_tokens))
        log.info("request %r on %s: %s after %d+%d tokens (%d cached), %.0f ms", generation.request.request_id,
                 result.model, result.finish_reason, result.prompt_tokens, result.completion_tokens,
                 result.cached_tokens, result.timings["totalMs"])
        generation.job.settle(result)

    def _fail_lane(self, name: str, exc: Exception) -> None:
        """A step failed (out of memory, or a bug): its requests get the error, the model stays."""
        lane = self._lanes.pop(name)
        log.error("generation on %s failed: %s", name, exc, exc_info=not is_out_of_memory(exc))
        sharding = self.registry.sharding
        if lane.loaded.sharded and sharding is not None:
            if sharding.diverged is None:  # a follower: rank 0 may not have failed; the group ends
                raise exc
            sharding.diverged(f"a step on {name} failed on rank 0: {type(exc).__name__}")
        for generation in lane.generations():
            generation.job.fail(_engine_error(exc, name, generation.request.method))
        try:
            lane.stop_all()
            lane.close()
        except Exception:  # the lane is broken already; its memory goes with it
            log.debug("closing a failed lane", exc_info=True)
        reset_global_random_state()

    # ---- model lifecycle, called from control jobs on this thread ---------------------------

    def stop_model(self, name: str, reason: CancelReason) -> None:
        """Everything running or waiting on a model ends now (it is being unloaded)."""
        lane = self._lanes.pop(name, None)
        if lane is not None:
            for generation in lane.generations():
                self.cancel(generation.job, reason)
            for generation in lane.stop_all():
                self._finish(generation)
            lane.close()
        with self._ready:
            queued: list[Job[Any]] = [*self._waiting, *self._embeds]
            doomed = [job for job in queued if job.model == name]
        for job in doomed:
            self.cancel(job, reason)

    def _stop_everything(self, reason: CancelReason) -> None:
        for name in list(self._lanes):
            self.stop_model(name, reason)
        with self._ready:
            pending = list(self._waiting) + list(self._control) + list(self._embeds)
        for job in pending:
            self.cancel(job, reason)


def _adopt_keep_alive(job: Job[Any], loaded: LoadedModel) -> None:
    """As Ollama: a request's keepAlive becomes its model's, once its work starts. On this
    thread, the one that owns a loaded model's options."""
    if job.keep_alive is not None:
        loaded.options.keep_alive = job.keep_alive


def _order(job: GenerationJob) -> GenerationOrder:
    assert isinstance(job.payload, GenerationOrder)  # what a generation job carries (Engine.submit_generation)
    return job.payload


def _work(job: EmbedJob) -> EmbeddingWork:
    assert isinstance(job.payload, EmbeddingWork)  # what an embed job carries (Engine.submit_embedding)
    return job.payload


def _log_embed_stopped(job: EmbedJob, reason: CancelReason | None) -> None:
    work = _work(job)
    log.info("embed request on %s stopped (%s) after %d of %d inputs", job.model,
             getattr(reason, "value", reason), work.finished, len(work.tokens))


def _injected_fault(tokens: Any, logits: Any) -> Any:
    raise RuntimeError("injected fault (LOCALMLX_INJECT_FAULTS=generation)")


def _injected_freeze(tokens: Any, logits: Any) -> Any:
    """What an MLX call that synchronizes while a collective is stuck does: wait in C holding
    the GIL (ctypes' PyDLL keeps it), so no thread of this process runs again."""
    import ctypes

    while True:
        ctypes.PyDLL(None).sleep(3600)


def _cancelled_before_start(job: GenerationJob, reason: CancelReason) -> GenerationResult:
    request = _order(job).request
    return GenerationResult.cancelled_before_start(job.model, request.received_at, request.stream, reason)


def _engine_error(exc: Exception, model: str, method: str) -> Exception:
    """What the request is answered: never the exception's text (it stays in the log)."""
    if isinstance(exc, RpcError):
        return exc
    if is_out_of_memory(exc):
        return OutOfMemory(f"Out of memory while generating on {model}", model=model)
    return InternalError(f"Internal error: {type(exc).__name__}", method=method)


