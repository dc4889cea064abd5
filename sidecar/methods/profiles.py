"""profiles/list, profiles/get, profiles/save, profiles/delete: the TOML files of sidecar.profiles."""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import Forbidden, ModelNotFound, brief
from ..inflight import InFlightRequest
from .table import rpc_method


@rpc_method("profiles/list")
async def list_profiles(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    """Malformed files are listed with why, never raised: one bad file must not hide the rest."""
    profiles, errors = await asyncio.to_thread(context.engine.profiles.catalog.store.list)
    return {"profiles": [p.to_wire() for p in profiles], "errors": errors}


@rpc_method("profiles/get")
async def get_profile(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    profile = await asyncio.to_thread(context.engine.profiles.catalog.store.get, params["name"])
    if profile is None:
        raise ModelNotFound(f"Profile not found: {params['name']}", profile=params["name"])
    return profile.to_wire()


@rpc_method("profiles/save")
async def save_profile(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    store = context.engine.profiles.catalog.store
    try:
        profile = await asyncio.to_thread(store.save, params["name"], params["profile"], params.get("overwrite", True))
    except OSError as exc:  # the profiles directory cannot be written
        raise Forbidden(f"Cannot write the profile {params['name']} in {store.write_dir}: {brief(exc)}",
                            profile=params["name"], path=str(store.write_dir)) from exc
    return profile.to_wire()


@rpc_method("profiles/delete")
async def delete_profile(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    deleted = await asyncio.to_thread(context.engine.profiles.catalog.store.delete, params["name"])
    return {"name": params["name"], "deleted": deleted}
