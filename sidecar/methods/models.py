"""models/list, models/load, models/unload, models/status, models/delete."""

from __future__ import annotations

import asyncio
from typing import Any

from .. import model_config
from ..engine.registry import ModelOptions, iso_utc
from ..errors import InvalidParams, ModelLoading
from ..hub import delete_model_files
from ..inflight import InFlightRequest
from ..profiles.apply import with_model_options
from ..settings import parse_duration
from ..tuning.adapters import delete_adapter, list_adapters
from ..vision.model import capabilities_on_disk
from .table import rpc_method


@rpc_method("models/list")
async def list_models(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    engine = context.engine

    def on_disk() -> list[dict[str, Any]]:  # walks directories and reads configs
        return [{"model": loc.name, "path": str(loc.path), "source": loc.source, "bytes": size,
                 "repo": loc.repo_id, **model_config.summary(loc.path), "capabilities": capabilities_on_disk(loc.path)}
                for loc, size in engine.locator.list_local()
                if loc.path is not None]  # always: a model on disk has a path

    models = await asyncio.to_thread(on_disk)
    for entry in models:
        loaded = engine.registry.peek(entry["model"])
        entry["loaded"] = loaded is not None
        entry["lastUsed"] = iso_utc(loaded.last_used_at) if loaded is not None else None
        if loaded is not None:
            entry["capabilities"] = loaded.description.get("capabilities", entry["capabilities"])
    adapters = await asyncio.to_thread(list_adapters, engine.locator.models_dir)
    variants = [m for m in engine.registry.loaded_models() if m.base is not None]
    return {"models": models, "adapters": [
        adapter.describe([m.name for m in variants if m.description.get("adapter") == adapter.name])
        for adapter in adapters]}


def _options(context: InFlightRequest, params: dict[str, Any], name: str) -> ModelOptions | None:
    """The options a models/load names; None when it names none (a loaded model keeps its own)."""
    if not any(key in params for key in ("keepAlive", "kvBits", "maxKvSize", "draftModel", "numDraftTokens",
                                         "promptLookup")):
        return None
    keep_alive = params.get("keepAlive")
    defaults = context.engine.default_options(name)
    return ModelOptions(
        keep_alive=context.settings.offload_inactive if keep_alive is None else parse_duration(keep_alive),
        kv_bits=params.get("kvBits"), max_kv_size=params.get("maxKvSize"),
        draft_model=params.get("draftModel", defaults.draft_model),
        num_draft_tokens=params.get("numDraftTokens"), prompt_lookup=bool(params.get("promptLookup", False)))


@rpc_method("models/load")
async def load_model(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    location, profile = await context.engine.resolve_named(params["model"])
    if "adapter" in params:
        location = await asyncio.to_thread(context.engine.locator.variant, location, params["adapter"])
    if profile is not None:
        params = with_model_options(profile, params)
    loaded, already = await context.engine.load(location, context.progress, _options(context, params, location.name))
    return dict(loaded.describe(), alreadyLoaded=already)


@rpc_method("models/unload")
async def unload_model(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    """Work running or waiting on the model is the server's to cancel (-32802, reason unload)."""
    engine = context.engine
    location, _ = await engine.resolve_named(params["model"])
    unloaded = await engine.submit_unload(location.name).future  # a cancel does not stop it
    return {"model": location.name, "unloaded": bool(unloaded)}


@rpc_method("models/delete")
async def delete_model(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    """Only files under the models dir or in the Hugging Face cache are ever deleted."""
    engine = context.engine
    if "adapter" in params:
        return await _delete_adapter(context, params["adapter"], bool(params.get("force", False)))
    if engine.profiles.catalog.lookup(params["model"]) is not None:
        raise InvalidParams(f"{params['model']} is a profile: profiles/delete removes it; delete its model by its own name",
                            errors=[{"path": "/model", "message": "names a profile"}], profile=params["model"])
    location = await engine.resolve(params["model"])
    if location.adapter is not None:
        adapter = location.name[len(location.base or "") + 1:]
        raise InvalidParams(f"{location.name} is a base model with an adapter: delete the adapter with "
                            f"adapter: {adapter!r}, or the base model by its own name",
                            errors=[{"path": "/model", "message": "names an adapter variant"}], model=location.name)
    if engine.is_loading(location.name):
        raise ModelLoading(f"Model is loading: {location.name} (retry later)", model=location.name)
    unloaded = False
    if engine.registry.is_loaded(location.name):
        if not params.get("force", False):
            raise InvalidParams(f"Model {location.name} is loaded: unload it first, or pass force: true",
                                errors=[{"path": "/force", "message": "the model is loaded"}],
                                model=location.name, loaded=True)
        unloaded = bool(await engine.submit_unload(location.name).future)
    freed = await asyncio.to_thread(delete_model_files, engine.locator, location)
    return {"model": location.name, "deleted": freed is not None, "bytesFreed": freed or 0, "unloaded": unloaded}


async def _delete_adapter(context: InFlightRequest, name: str, force: bool) -> dict[str, Any]:
    engine = context.engine
    variants = [m.name for m in engine.registry.loaded_models() if m.base is not None
                and m.description.get("adapter") == name]
    if variants and not force:
        raise InvalidParams(f"Adapter {name} is loaded as {', '.join(variants)}: unload it first, or pass force: true",
                            errors=[{"path": "/force", "message": "the adapter is loaded"}], adapter=name, loaded=True)
    for variant in variants:
        await engine.submit_unload(variant).future
    freed = await asyncio.to_thread(delete_adapter, engine.locator.models_dir, name)
    return {"model": name, "deleted": True, "bytesFreed": freed, "unloaded": bool(variants)}


@rpc_method("models/status")
async def model_status(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    engine = context.engine
    location, _ = await engine.resolve_named(params["model"])
    status: dict[str, Any] = {"model": location.name, "source": location.source,
                              "path": None if location.path is None else str(location.path),
                              "state": engine.model_state(location)}
    loaded = engine.registry.peek(location.name)
    if loaded is not None:
        status["description"] = loaded.describe()
    return status
