"""models/list, models/load, models/unload."""

from __future__ import annotations

import asyncio
from typing import Any

from . import rpc_method


async def run_job(context: Any, job: Any) -> Any:
    """Await an engine job on behalf of a request, so `$/cancelRequest` can find it."""
    context.job = job
    if context.cancel_reason is not None:  # cancelled while the job was being prepared
        context.session.cancel(context.id, context.cancel_reason)
    return await job.future


@rpc_method("models/list")
async def list_models(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    engine = context.engine
    found = await asyncio.to_thread(engine.locator.list_local)  # walks directories
    loaded = set(engine.registry.names())
    return {"models": [{"model": loc.name, "path": str(loc.path), "source": loc.source,
                        "bytes": size, "loaded": loc.name in loaded} for loc, size in found]}


@rpc_method("models/load")
async def load_model(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    location = context.engine.resolve(params["model"])
    return await run_job(context, context.engine.submit_load(location, context.progress))


@rpc_method("models/unload")
async def unload_model(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    engine = context.engine
    location = engine.resolve(params["model"])
    # Work queued or running on this model is the server's to cancel (-32802).
    for other in context.session.requests_on_model(location.name):
        context.session.cancel(other, reason="unload")
    unloaded = await run_job(context, engine.submit_unload(location.name))
    return {"model": location.name, "unloaded": bool(unloaded)}


@rpc_method("models/status")
async def model_status(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    engine = context.engine
    location = engine.resolve(params["model"])
    status: dict[str, Any] = {"model": location.name, "source": location.source,
                              "path": None if location.path is None else str(location.path),
                              "state": engine.model_state(location)}
    loaded = engine.registry.peek(location.name)
    if loaded is not None:
        status["description"] = loaded.description
    return status
