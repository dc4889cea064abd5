"""Which models are in memory: loads within the one memory budget, keep-alive expiry, and
unloads. Runs on the engine thread (it is called from control jobs and from the
scheduler's loop); other threads only read counters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..embeddings.detect import embedding_kind
from ..errors import OutOfMemory
from ..hub import ModelLocation, Progress, no_progress
from ..settings import Settings
from . import operations
from .budget import default_budget_bytes, models_to_unload
from .jobs import CancelReason
from .registry import LoadedModel, ModelOptions, ModelRegistry
from .scheduler import Scheduler

log = logging.getLogger("localmlx.residency")


class Residency:
    def __init__(self, settings: Settings, registry: ModelRegistry, scheduler: Scheduler,
                 held: Callable[[], set[str]] = set) -> None:
        self.settings = settings
        self.registry = registry
        self.scheduler = scheduler
        self._held = held
        self._budget = settings.memory_budget or None  # asked of MLX on first use
        self._drafts: dict[str, str] = {}  # a draft model loaded for a target -> that target
        self.reserved_bytes = 0  # held outside the registry: by fine-tuning runs (see sidecar.tuning)

    @property
    def budget(self) -> int:
        if self._budget is None:
            self._budget = default_budget_bytes()
        return self._budget

    def busy(self) -> set[str]:
        """Models with work on them or requests holding them, and the bases those share
        weights with: never unloaded to make room."""
        busy = self._held() | self.scheduler.models_with_work()
        return busy | {m.base for m in self.registry.loaded_models() if m.base is not None and m.name in busy}

    # ---- loading ---------------------------------------------------------------------------

    def load(self, location: ModelLocation, path: Path, required: int, options: ModelOptions,
             progress: Progress) -> LoadedModel:
        """Make room for `required` bytes (idle models go, least recently used first), load,
        and if the load fails, bring back what was unloaded for it."""
        existing = self.registry.get(location.name)
        if existing is not None:
            return existing
        required = self._share(location, path, required)
        keep = self.busy() | ({location.base} if location.base is not None else set())
        evicted = models_to_unload(required + self.reserved_bytes, self.budget, self.registry.loaded_models(), keep)
        for model in evicted:
            log.info("unloading %s to make room for %s (%d bytes needed, budget %d)",
                     model.name, location.name, required, self.budget)
            self.unload(model.name)
        try:
            loaded = self.registry.load(location, path, options, progress)
        except Exception:
            self._bring_back(evicted)
            raise
        self._keep_count(loaded)
        return loaded

    def _share(self, location: ModelLocation, path: Path, required: int) -> int:
        """What this rank must hold of a model: on a group the budget is per rank, and a text
        model is split over every rank (an embedding model stays whole on rank 0)."""
        sharding = self.registry.sharding
        if sharding is None or embedding_kind(path, location.name) is not None:
            return required
        share = -(-required // sharding.size)
        try:
            models_to_unload(share, self.budget, [], set())
        except OutOfMemory:
            raise OutOfMemory(f"Not enough memory in the group: {location.name} needs {required} bytes, "
                              f"{share} on each of its {sharding.size} ranks, and each rank's budget is "
                              f"{self.budget} bytes", requiredBytes=required, perRankBytes=share,
                              ranks=sharding.size, budgetBytes=self.budget) from None
        return share

    def _bring_back(self, models: list[LoadedModel]) -> None:
        for model in models:
            try:
                self.registry.load(model.location, model.path, model.options, no_progress)
                log.info("reloaded %s after the failed load that had unloaded it", model.name)
            except Exception as exc:  # its files changed meanwhile: it stays unloaded
                log.warning("could not reload %s: %s", model.name, exc)

    def _keep_count(self, keep: LoadedModel) -> None:
        """LOCALMLX_MAX_LOADED_MODELS: once a load has succeeded, idle models beyond it go.
        An adapter variant is part of its base: it counts, and goes, with it."""
        while len(bases := [m for m in self.registry.loaded_models() if m.base is None]) > self.settings.max_loaded_models:
            busy = self.busy() | {keep.name, keep.base or keep.name}
            idle = sorted((m for m in bases if m.name not in busy), key=lambda m: m.last_used)
            if not idle:
                return
            log.info("unloading %s (at most %d models loaded)", idle[0].name, self.settings.max_loaded_models)
            self.unload(idle[0].name)

    def bind_draft(self, target: str, draft: str) -> None:
        """`draft` was loaded for `target`'s requests: it goes when `target` goes."""
        self._drafts[draft] = target

    def unload(self, name: str, reason: CancelReason = CancelReason.UNLOAD) -> bool:
        loaded = self.registry.peek(name)
        mirror = self.scheduler.mirror
        if mirror is not None and loaded is not None and loaded.sharded:
            mirror.send(operations.unload(name, reason))
        self.scheduler.stop_model(name, reason)
        self._drafts.pop(name, None)
        unloaded = self.registry.unload(name)
        busy = self.busy()
        for draft in [d for d, target in self._drafts.items() if target == name and d not in busy]:
            log.info("unloading %s with %s, which it was loaded to draft for", draft, name)
            self.unload(draft, reason)
        for variant in [m.name for m in self.registry.loaded_models() if m.base == name]:
            log.info("unloading %s with %s, whose weights it shares", variant, name)
            self.unload(variant, reason)
        return unloaded

    # ---- keep-alive ------------------------------------------------------------------------

    def expire_idle(self) -> float | None:
        """Unload models whose keep-alive ran out; seconds until the next one might, or None."""
        busy = self.busy()
        next_due: float | None = None
        for model in self.registry.loaded_models():
            due = model.expires_in
            if due is None or model.name in busy:
                continue
            if due <= 0:
                log.info("unloading %s: unused for its keep-alive of %g s", model.name, model.options.keep_alive)
                self.unload(model.name)
            else:
                next_due = due if next_due is None else min(next_due, due)
        return next_due

    def bytes_loaded(self) -> int:
        return self.registry.bytes_loaded()

