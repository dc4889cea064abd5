"""models/list, models/load, models/unload, models/status."""

from __future__ import annotations

import asyncio
from typing import Any

from . import rpc_method


@rpc_method("models/list")
async def list_models(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    engine = context.engine
    found = await asyncio.to_thread(engine.locator.list_local)  # walks directories
    loaded = set(engine.registry.names())
    return {"models": [{"model": loc.name, "path": str(loc.path), "source": loc.source,
                        "bytes": size, "loaded": loc.name in loaded} for loc, size in found]}


@rpc_method("models/load")
async def load_model(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    location = await context.engine.resolve(params["model"])
    context.model = location.name
    loaded, already = await context.engine.load(location, context.progress)
    return dict(loaded.description, alreadyLoaded=already)


@rpc_method("models/unload")
async def unload_model(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Work running or waiting on the model is the server's to cancel (-32802, reason unload)."""
    engine = context.engine
    location = await engine.resolve(params["model"])
    context.job = engine.submit_unload(location.name)
    unloaded = await context.job.future
    return {"model": location.name, "unloaded": bool(unloaded)}


@rpc_method("models/status")
async def model_status(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    engine = context.engine
    location = await engine.resolve(params["model"])
    status: dict[str, Any] = {"model": location.name, "source": location.source,
                              "path": None if location.path is None else str(location.path),
                              "state": engine.model_state(location)}
    loaded = engine.registry.peek(location.name)
    if loaded is not None:
        status["description"] = loaded.description
    return status
