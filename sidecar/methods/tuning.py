"""models/finetune and models/fuse: both run in a worker process (see sidecar.tuning)."""

from __future__ import annotations

from typing import Any

from ..inflight import InFlightRequest
from ..tuning.finetune import finetune
from ..tuning.fuse import fuse
from .table import rpc_method


@rpc_method("models/finetune")
async def finetune_model(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    """A cancel stops the trainer at its next step (within seconds) and answers -32800."""
    return await finetune(context, params)


@rpc_method("models/fuse")
async def fuse_model(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    return await fuse(context, params)
