"""The engine: models, generation and the caches, as the methods layer sees them.

MLX work runs on the scheduler's one thread; file work (building, downloading, checking a
model's files) and tokenization run on worker threads; the event loop only awaits. Every
cancellation goes through `Engine.cancel(job, reason)`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio

from ..embeddings.work import EmbeddingWork
from ..embeddings.work import tokenize as embedding_tokens
from ..errors import InvalidParams, ModelLoadFailed, ModelLoading, ModelNotLoaded, RpcError, brief
from ..hub import ModelLocation, ModelLocator, Progress, no_progress
from ..profiles.service import Profiles
from ..profiles.store import Profile
from ..settings import Settings
from ..text import clean_text
from ..tuning.adapters import WEIGHTS_FILE
from ..vision.images import image_refs, read_images
from ..vision.model import refuse_images
from . import gil_waits, operations
from .budget import tensor_bytes, weight_bytes
from .generation import GenerationOrder, GenerationRequest, GenerationResult, PreparedGeneration, prepare
from .jobs import CancelReason, Job
from .memory import memory_snapshot
from .registry import LoadedModel, ModelOptions, ModelRegistry
from .residency import Residency
from .response_cache import CachedResponse, response_key
from .scheduler import Scheduler
from .speculation import Speculation, check_draft

__all__ = ["CancelReason", "Engine", "GenerationRequest", "GenerationResult", "Job"]

log = logging.getLogger("localmlx.engine")

T = TypeVar("T")


QUICK_PREPARE_CHARS = 4096  # a request this short tokenizes in well under a millisecond


def _quick_to_prepare(request: GenerationRequest) -> bool:
    """Short text and no grammar to compile (tools, responseFormat): prepared on the loop."""
    if request.tools or request.response_format:
        return False
    if request.messages is None:
        return len(request.prompt or "") < QUICK_PREPARE_CHARS
    size = 0
    for message in request.messages:
        content = message.get("content")
        size += len(content) if isinstance(content, str) else QUICK_PREPARE_CHARS
    return size < QUICK_PREPARE_CHARS


def _describe_device() -> str:
    import mlx.core as mx

    kind = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    try:
        info = mx.device_info()
        name = info.get("device_name") or info.get("architecture")
    except Exception:  # some backends expose no device info
        name = None
    return f"{kind} ({name})" if name else kind


class GroupView(Protocol):
    """The group this engine is rank 0 of, as status shows it (see sidecar.distributed)."""

    def describe(self, own_memory: dict[str, int] | None = None) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Engine:
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop,
                 join_group: Callable[[Engine], GroupView] | None = None) -> None:
        """`join_group`: forms the group this engine is rank 0 of, first thing on the engine
        thread (it starts the other ranks and wires them to this engine)."""
        self.settings = settings
        self.loop = loop
        self._join_group = join_group
        self.group: GroupView | None = None
        self.locator = ModelLocator(settings)
        self.profiles = Profiles(settings)
        self.registry = ModelRegistry(settings)
        self._device: asyncio.Future[str] = loop.create_future()
        self._loads: dict[str, asyncio.Task[LoadedModel]] = {}
        self._tokenizer_locks: dict[str, threading.Lock] = {}
        self._holds: collections.Counter[str] = collections.Counter()  # on the loop thread only
        self.scheduler = Scheduler(settings, self.registry, on_start=self._start_engine_thread)
        self.residency = Residency(settings, self.registry, self.scheduler, held=self.held_models)
        self.scheduler.housekeeping = self.residency.expire_idle
        self.scheduler.start()  # last: its thread uses all of the above

    def _start_engine_thread(self) -> None:
        """First thing on the engine thread: ask MLX for the device and the memory budget
        (what `initialize` waits for), then import mlx-lm, which takes seconds, while the
        client proceeds."""
        device: str | BaseException
        if self._join_group is not None:
            self.group = self._join_group(self)
        try:
            device = _describe_device()
            self.residency.budget  # noqa: B018 (asked now, on this thread)
        except BaseException as exc:
            device = exc
        self._settle_device(device)
        import mlx_lm  # noqa: F401

        gil_waits.install()

    def _settle_device(self, outcome: str | BaseException) -> None:
        def set_outcome() -> None:
            if self._device.done():
                return
            if isinstance(outcome, BaseException):
                self._device.set_exception(outcome)
            else:
                self._device.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self.loop.call_soon_threadsafe(set_outcome)

    async def device_description(self) -> str:
        """"gpu (Apple M3 Max)" or "cpu": asked on the engine thread, like all MLX calls."""
        return await asyncio.shield(self._device)

    # ---- models ------------------------------------------------------------------------

    def default_model(self) -> str:
        """The model of a request that names none: the most recently used loaded one, else
        the configured default."""
        loaded = sorted(self.registry.loaded_models(), key=lambda m: m.last_used)
        return loaded[-1].name if loaded else self.settings.default_model

    async def resolve(self, ref: str | None) -> ModelLocation:
        """A loaded model by its name (its files may have gone since); anything else may
        look at the disk and the Hugging Face cache: done on a worker thread."""
        ref = self.default_model() if ref is None else ref
        loaded = self.registry.peek(ref)
        if loaded is not None:
            return loaded.location
        return await asyncio.to_thread(self.locator.resolve, ref)

    async def resolve_named(self, ref: str | None) -> tuple[ModelLocation, Profile | None]:
        """Like resolve, where `ref` may also name a profile: then its model (with its adapter)."""
        profile = self.profiles.catalog.lookup(ref)
        if profile is None:
            return await self.resolve(ref), None
        return await self.profiles.location(self, profile.model, profile.adapter), profile

    def is_loading(self, name: str) -> bool:
        return name in self._loads

    def model_state(self, location: ModelLocation) -> str:
        if self.registry.is_loaded(location.name):
            return "loaded"
        if self.is_loading(location.name):
            return "loading"
        return "downloadable" if location.path is None else "available"

    async def load(self, location: ModelLocation, progress: Progress = no_progress,
                   options: ModelOptions | None = None) -> tuple[LoadedModel, bool]:
        """Returns (model, already_loaded). Concurrent loads of one model share one load,
        which goes on even when the request that started it is cancelled. Options given for
        a loaded model replace its own (its keep-alive starts again)."""
        loaded = self.registry.get(location.name)
        if loaded is not None:
            if options is not None:
                await self._change_options(loaded, options)
            return loaded, True
        task = self._loads.get(location.name)
        if task is None:
            options = options or self.default_options(location.name)
            task = self.loop.create_task(self._load(location, progress, options))
            self._loads[location.name] = task
            task.add_done_callback(functools.partial(self._load_ended, location.name))
        return await asyncio.shield(task), False

    def default_options(self, name: str) -> ModelOptions:
        """What a model gets when it loads without options of its own: the keep-alive and the
        draft model that the settings give it."""
        drafts = dict(self.settings.draft_models)
        return ModelOptions(keep_alive=self.settings.offload_inactive, draft_model=drafts.get(name))

    async def _change_options(self, loaded: LoadedModel, options: ModelOptions) -> None:
        """On the engine thread, which owns a loaded model's options (and then looks at
        keep-alives again: this one may now run out sooner)."""
        def change(job: Job[None]) -> None:
            kv_changed = (options.kv_bits, options.max_kv_size) != (loaded.options.kv_bits, loaded.options.max_kv_size)
            mirror = self.scheduler.mirror
            if mirror is not None and loaded.sharded:
                mirror.send(operations.options(loaded.name, options))
            loaded.options = options
            if kv_changed and loaded.response_cache is not None:
                loaded.response_cache.clear()  # its answers were computed with the other KV cache

        job = Job("options", self.loop, model=loaded.name, run=change)
        self.scheduler.submit_control(job)
        await job.future

    def _load_ended(self, name: str, task: asyncio.Task[LoadedModel]) -> None:
        self._loads.pop(name, None)
        if not task.cancelled() and task.exception() is not None:
            log.info("load of %s failed: %s", name, task.exception())

    async def _load(self, location: ModelLocation, progress: Progress, options: ModelOptions) -> LoadedModel:
        if location.adapter is not None:  # its base first: loaded once, shared by all its adapters
            await self.load(location.base_location(), progress)
        adapter = location.adapter

        def files_and_size() -> tuple[Path, int]:
            path = self.locator.materialize(location, progress)
            return path, weight_bytes(path) if adapter is None else tensor_bytes(adapter / WEIGHTS_FILE)

        try:
            path, required = await asyncio.to_thread(files_and_size)
        except RpcError:
            raise
        except Exception as exc:
            log.exception("preparing the files of %s failed", location.name)
            raise ModelLoadFailed(f"Model load failed for {location.name}: {brief(exc)}",
                                  model=location.name, reason=type(exc).__name__) from exc

        def run(job: Job[LoadedModel]) -> LoadedModel:
            return self.residency.load(location, path, required, options, progress)

        job = Job("load", self.loop, model=location.name, run=run)
        self.scheduler.submit_control(job)
        return await job.future

    async def ensure_loaded(self, location: ModelLocation, progress: Progress = no_progress) -> LoadedModel:
        """The model for a request: loaded just in time when allowed (as Ollama does)."""
        loaded = self.registry.get(location.name)
        if loaded is not None:
            return loaded
        if not self.settings.jit_load:
            if self.is_loading(location.name):
                raise ModelLoading(f"Model is loading: {location.name} (retry later)", model=location.name)
            raise ModelNotLoaded(f"Model not loaded: {location.name} (load it with models/load)",
                                 model=location.name)
        return (await self.load(location, progress))[0]

    @contextlib.contextmanager
    def holding(self, name: str) -> Iterator[None]:
        """A request holds its model from before it is loaded to its answer: meanwhile the
        model is not unloaded to make room nor for its keep-alive (an explicit unload still
        cancels the request's work)."""
        self._holds[name] += 1
        try:
            yield
        finally:
            self._holds[name] -= 1
            if not self._holds[name]:
                del self._holds[name]
            loaded = self.registry.peek(name)
            if loaded is not None:
                loaded.touch()  # its keep-alive counts from here
            self.scheduler.poke()  # keep-alive 0: it may go now

    def held_models(self) -> set[str]:
        """Read from the engine thread: a copy, made in one step."""
        return set(self._holds.copy())

    def submit_unload(self, name: str) -> Job[bool]:
        job = Job("unload", self.loop, model=name, run=lambda job: self.residency.unload(name))
        self.scheduler.submit_control(job)
        return job

    async def unload_all(self, reason: CancelReason = CancelReason.SHUTDOWN) -> None:
        def run(job: Job[None]) -> None:
            for name in self.registry.names():
                self.residency.unload(name, reason)

        job = Job("unload", self.loop, run=run)
        self.scheduler.submit_control(job)
        await job.future

    async def preload(self, refs: tuple[str, ...]) -> None:
        """LOCALMLX_PRELOAD_MODELS, side by side; a model that cannot load is logged."""
        async def preload_one(ref: str) -> None:
            ref = self.settings.default_model if ref.lower() == "true" else ref
            try:
                await self.load(await self.resolve(ref))
            except Exception as exc:
                log.error("cannot preload %s: %s", ref, getattr(exc, "message", exc))

        async with anyio.create_task_group() as loads:
            for ref in refs:
                loads.start_soon(preload_one, ref)

    # ---- generation --------------------------------------------------------------------

    async def read_images(self, request: GenerationRequest) -> None:
        """Every image of the request's messages read and checked (worker thread), before its
        model is loaded: a bad image costs nothing but its own check."""
        if image_refs(request.messages):
            request.images = await asyncio.to_thread(read_images, self.settings, self.locator, request.messages)

    async def prepare(self, loaded: LoadedModel, request: GenerationRequest) -> PreparedGeneration:
        """Tokenize and check on a worker thread: the engine thread only runs the model."""
        if loaded.embedder is not None:
            raise InvalidParams(f"Model {loaded.name} is an embedding model: it serves embed, not {request.method}",
                                errors=[{"path": "/model", "message": "an embedding model cannot generate"}],
                                model=loaded.name, capabilities=["embed"])
        if request.images and loaded.vision is None:
            raise refuse_images(loaded.name, loaded.description.get("capabilities", []))
        work = functools.partial(prepare, loaded, request)
        return await self._tokenizing(loaded, work, inline=_quick_to_prepare(request))

    async def speculation_for(self, loaded: LoadedModel, request: GenerationRequest,
                              progress: Progress = no_progress) -> Speculation | None:
        """How a request drafts when it is alone on its model: with its draft model (its own,
        else its model's), loaded beside the target under the same budget and unloaded with
        it; else from its own n-grams when it (or its model) asks for prompt lookup."""
        options = loaded.options
        if loaded.sharded:
            return None  # every rank would have to draft and check alike: not done on a group
        if loaded.vision is not None:
            if request.draft_model is not None:
                raise InvalidParams(f"Model {loaded.name} is a vision model: it does not decode speculatively",
                                    errors=[{"path": "/draftModel", "message": "not for a vision model"}])
            return None
        name = None if request.no_draft else request.draft_model or options.draft_model
        tokens = request.num_draft_tokens or options.num_draft_tokens
        if name is None:
            lookup = options.prompt_lookup if request.prompt_lookup is None else request.prompt_lookup
            return Speculation(None, tokens) if lookup else None
        location = await self.resolve(name)
        if location.name == loaded.name:
            raise InvalidParams(f"Model {loaded.name} cannot be its own draft model",
                                errors=[{"path": "/draftModel", "message": "names the model itself"}])
        draft, already = await self.load(location, progress)
        if not already:
            self.residency.bind_draft(loaded.name, draft.name)
        check_draft(loaded, draft)
        draft.touch()
        return Speculation(draft, tokens)

    def submit_generation(self, order: GenerationOrder, model: str) -> Job[GenerationResult]:
        job = Job[GenerationResult]("generate", self.loop, model=model, payload=order,
                                    keep_alive=order.request.keep_alive)
        self.scheduler.submit_generation(job)
        return job

    # ---- embeddings --------------------------------------------------------------------

    async def prepare_embedding(self, loaded: LoadedModel, texts: list[str], dimensions: int,
                                normalize: bool, progress: Progress = no_progress) -> EmbeddingWork:
        """Tokenize and check on a worker thread: the engine thread only runs the model."""
        embedder = loaded.embedder
        assert embedder is not None  # the embed method has checked that it is an embedding model

        def tokens() -> list[list[int]]:
            return embedding_tokens(loaded.tokenizer, texts, embedder.max_tokens, loaded.bytes_per_token)

        rows = await self._tokenizing(loaded, tokens)
        return EmbeddingWork(loaded, rows, dimensions, normalize, progress)

    def submit_embedding(self, work: EmbeddingWork, model: str, keep_alive: float | None = None) -> Job[dict[str, Any]]:
        job = Job[dict[str, Any]]("embed", self.loop, model=model, payload=work, keep_alive=keep_alive)
        self.scheduler.submit_embedding(job)
        return job

    def cached_response(self, loaded: LoadedModel, request: GenerationRequest) -> CachedResponse | None:
        cache = loaded.response_cache
        key = response_key(request) if cache is not None else None
        return cache.get(key) if cache is not None and key is not None else None

    def cancel(self, job: Job[Any], reason: CancelReason) -> None:
        """The one way work is cancelled: by the client, shutdown, exit or unload."""
        self.scheduler.cancel(job, reason)

    async def tokenize(self, loaded: LoadedModel, text: str, add_special_tokens: bool) -> list[int]:
        def encode() -> list[int]:
            return list(loaded.tokenizer.encode(clean_text(text), add_special_tokens=add_special_tokens))

        return await self._tokenizing(loaded, encode)

    async def _tokenizing(self, loaded: LoadedModel, work: Callable[[], T], inline: bool = False) -> T:
        """`work` on a worker thread, holding the model's tokenizer: fast tokenizers are not
        safe to drive from several threads at once. `inline`: work short enough (well under a
        millisecond) to do here when the tokenizer is free, sparing the hop to a worker thread
        and back, which costs more than the work on a busy machine."""
        # An adapter variant shares its base's tokenizer, and so its lock.
        lock = self._tokenizer_locks.setdefault(loaded.base or loaded.name, threading.Lock())
        if inline and lock.acquire(blocking=False):
            try:
                return work()
            finally:
                lock.release()

        def locked() -> T:
            with lock:
                return work()

        return await asyncio.to_thread(locked)

    # ---- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Read from the loop thread while the engine works: only counters and snapshots."""
        models = self.registry.loaded_models()
        memory = memory_snapshot() if self._device.done() else dict.fromkeys(
            ("activeBytes", "peakBytes", "cacheBytes", "rssBytes"), 0)  # MLX is still being imported
        memory["promptCacheBytes"] = sum(m.prefix_cache_bytes for m in models)
        memory["modelBytes"] = sum(m.bytes for m in models)
        memory["budgetBytes"] = self.memory_budget()
        return {
            "models": self.registry.describe_all(),
            "requests": self.scheduler.counts(),
            "memory": memory,
            "caches": {m.name: self._describe_caches(m) for m in models},
            "group": self.group.describe(memory_snapshot()) if self.group is not None else None,
        }

    def memory_budget(self) -> int:
        return self.settings.memory_budget or (self.residency.budget if self._device.done() else 0)

    def unreserved_bytes(self) -> int:
        """What the budget has left beside the loaded models and the running tuning workers."""
        return self.memory_budget() - self.residency.bytes_loaded() - self.residency.reserved_bytes

    @staticmethod
    def _describe_caches(loaded: LoadedModel) -> dict[str, Any]:
        prefix = loaded.prefix_cache
        return {"prefixBytes": loaded.prefix_cache_bytes, "prefixEntries": len(prefix) if prefix is not None else 0,
                "responses": loaded.response_cache.describe() if loaded.response_cache is not None else None}

    async def close(self, grace_s: float) -> None:
        """Stop the engine thread; running generations end at their next step."""
        deadline = time.monotonic() + grace_s
        await asyncio.to_thread(self.profiles.stats.save)
        await asyncio.to_thread(self.scheduler.stop, max(0.0, deadline - time.monotonic()))
