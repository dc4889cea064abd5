"""initialize, ping, shutdown, server/status."""

from __future__ import annotations

import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .. import __version__, schema
from ..blas import blas_in_use
from ..inflight import InFlightRequest
from ..protocol_defs import PROTOCOL_VERSION
from .table import rpc_method

log = logging.getLogger("localmlx.session")


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


@rpc_method("initialize")
async def initialize(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    session, settings = context.session, context.settings
    session.lifecycle.initialized = True
    session.lifecycle.client_info = params.get("clientInfo") or {}
    log.info("initialized by %s", session.lifecycle.client_info or "an unnamed client")
    return {
        "protocolVersion": PROTOCOL_VERSION,
        "serverInfo": {"name": "localmlx", "version": __version__, "mlx": _package_version("mlx"),
                       "mlxLm": _package_version("mlx-lm"), "device": await context.engine.device_description(),
                       "blas": blas_in_use().to_json(), "group": _group(context)},
        "capabilities": {"streaming": True, "cancellation": True, "progress": True,
                         "batching": settings.batching, "responseCache": settings.enable_cache,
                         "methods": schema.method_names()},
        "limits": {"maxLineBytes": settings.max_line_bytes, "maxQueue": settings.max_queue,
                   "maxLoadedModels": settings.max_loaded_models, "maxBatchSize": settings.max_batch_size,
                   "streamBufferBytes": settings.stream_buffer_bytes,
                   "memoryBudgetBytes": context.engine.memory_budget()},
        "defaults": {"model": settings.default_model, "maxTokens": settings.max_tokens,
                     "temperature": settings.temperature},
    }


def _group(context: InFlightRequest) -> dict[str, Any] | None:
    """The ranks of the group this sidecar is rank 0 of (formed before the device is known)."""
    group = context.engine.group
    return group.describe() if group is not None else None


@rpc_method("ping")
async def ping(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    return {}


@rpc_method("shutdown")
async def shutdown(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    await context.session.shutdown(context.id)
    return {}


@rpc_method("server/status")
async def server_status(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    status = context.engine.status()
    status["uptimeMs"] = round((time.monotonic() - context.session.started_at) * 1000, 3)
    status["blas"] = blas_in_use().to_json()
    return status
