"""The engine: every MLX operation, run as jobs on one thread.

Public surface for the methods layer: resolve a model reference, then submit loads,
unloads, generations and tokenizations; each returns a Job whose future the caller awaits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..errors import ModelLoading, ModelNotLoaded
from ..hub import ModelLocation, ModelLocator
from ..settings import Settings
from .generation import GenerationRequest, Generator
from .memory import MemoryTracker
from .registry import LoadedModel, ModelRegistry, Progress
from .worker import EngineWorker, Job

log = logging.getLogger("localmlx.engine")


def _no_progress(*_: Any) -> None:
    pass


def _describe_device() -> str:
    import mlx.core as mx

    kind = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    try:
        info = mx.device_info()
        name = info.get("device_name") or info.get("architecture")
    except Exception:  # some backends expose no device info
        name = None
    return f"{kind} ({name})" if name else kind


class Engine:
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop,
                 send_notification: Callable[[str, dict[str, Any]], None]) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.settings = settings
        self.locator = ModelLocator(settings)
        self.registry = ModelRegistry(settings.max_loaded_models)
        self.memory = MemoryTracker()
        prompt_cache = (LRUPromptCache(settings.prompt_cache_size, settings.prompt_cache_bytes)
                        if settings.enable_cache else None)
        self.generator = Generator(prompt_cache, self.memory)
        self.worker = EngineWorker(loop, settings.max_queue)
        self._send_notification = send_notification
        # Asked first, before any preload, so initialize never waits behind a load.
        self._device = self._submit(Job("probe", lambda job: _describe_device()), force=True).future

    # ---- models ------------------------------------------------------------------------

    def resolve(self, ref: str | None) -> ModelLocation:
        """No model named: the most recently used loaded model, else the default."""
        if ref is None:
            loaded = sorted(self._loaded_models(), key=lambda m: m.last_used)
            ref = loaded[-1].name if loaded else self.settings.default_model
        return self.locator.resolve(ref)

    def _loaded_models(self) -> list[LoadedModel]:
        return [m for name in self.registry.names() if (m := self.registry.peek(name)) is not None]

    def submit_load(self, location: ModelLocation, progress: Progress = _no_progress) -> Job:
        def run(job: Job) -> dict[str, Any]:
            loaded, already = self.registry.load(location, progress)
            return dict(loaded.description, alreadyLoaded=already)

        return self._submit(Job("load", run, model=location.name))

    def _is_loading(self, name: str) -> bool:
        """Derived from the queue, so a withdrawn or failed load can never leave it stale."""
        jobs = [self.worker.current, *self.worker.queued]
        return any(job is not None and job.kind == "load" and job.model == name for job in jobs)

    def submit_unload(self, name: str) -> Job:
        return self._submit(Job("unload", lambda job: self.registry.unload(name), model=name), force=True)

    async def unload_all(self) -> None:
        await self._submit(Job("unload", lambda job: self.registry.unload_all()), force=True).future

    def preload(self, refs: tuple[str, ...]) -> None:
        for ref in refs:
            ref = self.settings.default_model if ref.lower() == "true" else ref
            try:
                self.submit_load(self.resolve(ref))
            except Exception as exc:
                log.error("cannot preload %s: %s", ref, getattr(exc, "message", exc))

    def _ensure_loaded(self, location: ModelLocation, progress: Progress = _no_progress) -> LoadedModel:
        """On the engine thread: the model, loaded just in time when allowed."""
        loaded = self.registry.get(location.name)
        if loaded is not None:
            return loaded
        if not self.settings.jit_load:
            raise self._not_loaded(location.name)
        return self.registry.load(location, progress)[0]

    def _not_loaded(self, name: str) -> Exception:
        if self._is_loading(name):
            return ModelLoading(f"Model is loading: {name} (retry later)", model=name)
        return ModelNotLoaded(f"Model not loaded: {name} (load it with models/load)", model=name)

    def model_state(self, location: ModelLocation) -> str:
        if self.registry.is_loaded(location.name):
            return "loaded"
        if self._is_loading(location.name):
            return "loading"
        return "downloadable" if location.path is None else "available"

    def check_available(self, location: ModelLocation) -> None:
        """Fail fast, before queueing, when just-in-time loading is off."""
        if not self.settings.jit_load and not self.registry.is_loaded(location.name):
            raise self._not_loaded(location.name)

    # ---- work ----------------------------------------------------------------------------

    def submit_generation(self, location: ModelLocation, request: GenerationRequest,
                          progress: Progress = _no_progress) -> Job:
        def send_chunk(params: dict[str, Any]) -> None:
            self._send_notification("generate/chunk", params)

        def run(job: Job) -> dict[str, Any]:
            return self.generator.run(job, self._ensure_loaded(location, progress), request, send_chunk)

        self.check_available(location)
        return self._submit(Job("generate", run, model=location.name))

    def submit_tokenize(self, location: ModelLocation, text: str, add_special_tokens: bool) -> Job:
        from .generation import clean_text

        def run(job: Job) -> list[int]:
            tokenizer = self._ensure_loaded(location).tokenizer
            return list(tokenizer.encode(clean_text(text), add_special_tokens=add_special_tokens))

        self.check_available(location)
        return self._submit(Job("tokenize", run, model=location.name))

    def _submit(self, job: Job, force: bool = False) -> Job:
        self.worker.submit(job, force=force)
        return job

    async def device_description(self) -> str:
        """"gpu (Apple M3 Max)" or "cpu": asked on the engine thread, like all MLX calls."""
        return await asyncio.shield(self._device)

    # ---- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Read from the loop thread while the engine works: only counters and snapshots."""
        running = self.worker.current
        prompt_cache = self.generator.prompt_cache
        memory = self.memory.snapshot()
        memory["promptCacheBytes"] = int(prompt_cache.nbytes) if prompt_cache is not None else 0
        return {
            "models": self.registry.describe_all(),
            "requests": {"active": 0 if running is None else 1, "queued": len(self.worker.queued)},
            "memory": memory,
        }
