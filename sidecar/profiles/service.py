"""Profiles as the methods see them: the profile (or, for model "auto", the routed choice)
behind a request's model name, and what each profile's requests measured."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParams, RpcError
from ..settings import Settings
from .apply import NO_PROFILE, ProfileSetup, apply_profile
from .catalog import ProfileCatalog, profile_directories
from .routing import Candidate, RoutingStats, choose, conversation_key

if TYPE_CHECKING:
    from ..engine import Engine
    from ..hub import ModelLocation

AUTO = "auto"
SAVE_EVERY_S = 5.0


class Profiles:
    def __init__(self, settings: Settings) -> None:
        self.catalog = ProfileCatalog(settings)
        self.stats = RoutingStats.load(profile_directories(settings)[0] / "routing.json")
        self._saved_at = 0.0

    def setup_for(self, params: dict[str, Any]) -> tuple[dict[str, Any], ProfileSetup]:
        """The params of a request naming a profile, with the profile's settings under its own."""
        profile = self.catalog.lookup(params.get("model"))
        return (params, NO_PROFILE) if profile is None else apply_profile(profile, params)

    async def route(self, engine: Engine, params: dict[str, Any]) -> tuple[dict[str, Any], ProfileSetup]:
        """model "auto": the profile chosen for this request (see routing), and why."""
        candidates = [await self._candidate(engine, profile) for profile in self.catalog.profiles()]
        profile, why = choose(params, candidates, self.stats)
        if profile is None:
            raise InvalidParams(f"model auto: {why['reason']} (profiles/save makes one, and `tasks` says what it is for)",
                                errors=[{"path": "/model", "message": why["reason"]}], routedBy=why)
        return apply_profile(profile, params, why)

    async def _candidate(self, engine: Engine, profile: Any) -> Candidate:
        from ..engine.budget import weight_bytes
        from ..vision.model import is_vision_model

        try:
            location = await self.location(engine, profile.model, profile.adapter)
        except RpcError:
            return Candidate(profile, loaded=False, fits=False)
        loaded = engine.registry.peek(location.name)
        if loaded is not None:
            return Candidate(profile, loaded=True, fits=True, vision=loaded.vision is not None)
        path = location.path
        try:
            need = await asyncio.to_thread(weight_bytes, path) if path is not None else None
        except RpcError:
            return Candidate(profile, loaded=False, fits=False)
        vision = path is not None and await asyncio.to_thread(is_vision_model, path)
        return Candidate(profile, loaded=False, fits=need is not None and need <= engine.memory_budget(), vision=vision)

    @staticmethod
    async def location(engine: Engine, model: str | None, adapter: str | None) -> ModelLocation:
        location = await engine.resolve(model)
        if adapter is not None:
            location = await asyncio.to_thread(engine.locator.variant, location, adapter)
        return location

    async def record(self, setup: ProfileSetup, params: dict[str, Any], result: dict[str, Any] | None,
                     failed: bool = False) -> None:
        """What one request served through a profile measured (a client's own mistakes, -32602
        and the like, are not the profile's failures: the caller does not record those)."""
        if setup.profile is None:
            return
        now = time.time()
        timings = (result or {}).get("timings") or {}
        self.stats.record(setup.profile.name, now, ok=not failed,
                          cancelled=(result or {}).get("finishReason") == "cancelled",
                          tokens_per_second=timings.get("tokensPerSecond"),
                          ttft_s=(timings["ttftMs"] / 1000) if "ttftMs" in timings else None,
                          conversation=conversation_key(params))
        if now - self._saved_at >= SAVE_EVERY_S:
            self._saved_at = now
            await asyncio.to_thread(self.stats.save)
