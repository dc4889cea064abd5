"""models/fuse on the sidecar's side: a standalone model from a base and an adapter, written
by the fuse worker into the models dir, where it loads like any other model."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import anyio

from ..errors import InvalidParams, ModelLoadFailed, OutOfMemory
from ..hub import tree_bytes
from ..inflight import InFlightRequest
from ..model_config import quantization, read_config
from .adapters import name_from
from .workers import Worker


async def fuse(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    from ..engine.budget import weight_bytes

    engine = context.engine
    locator = engine.locator
    base = await engine.resolve(params["model"])
    variant = await asyncio.to_thread(locator.variant, base, params["adapter"])
    adapter_name = variant.name[len(base.name) + 1:]
    name = params.get("name") or name_from(f"{base.name}-{adapter_name}") or "fused"
    final = locator.models_dir / name
    if final.exists() and not params.get("overwrite", False):
        raise InvalidParams(f"A model named {name} exists in the models dir: choose another name or pass overwrite",
                            errors=[{"path": "/name", "message": "exists"}], model=name)
    model_path = await asyncio.to_thread(locator.materialize, base, context.progress)
    required = 2 * await asyncio.to_thread(weight_bytes, model_path)  # the fused copy and its quantized one
    available = engine.unreserved_bytes()
    if required > available:
        raise OutOfMemory(f"Not enough memory to fuse {variant.name}: about {required} bytes needed, "
                          f"{max(available, 0)} free in the budget", requiredBytes=required,
                          availableBytes=max(available, 0), budgetBytes=engine.memory_budget())
    spec = {"model_path": str(model_path), "adapter_path": str(variant.adapter), "final_dir": str(final),
            "quantize": params.get("quantize"), "dequantize": bool(params.get("dequantize", False)),
            "overwrite": bool(params.get("overwrite", False))}
    engine.residency.reserved_bytes += required
    worker = await Worker.start("fuse", spec, context.settings.blas)
    outcome: dict[str, Any] = {"event": "died"}
    try:
        async for event in worker.events():
            if event["event"] == "phase":
                context.progress(event["phase"], ("load", "fuse", "save").index(event["phase"]), 3, "phase")
            elif event["event"] in ("done", "error"):
                outcome = event
    finally:
        with anyio.CancelScope(shield=True):
            code = await worker.stop()
            engine.residency.reserved_bytes -= required
            for leftover in final.parent.glob(f".{final.name}.staged-*"):  # a fuse stopped half-way
                await asyncio.to_thread(shutil.rmtree, leftover, True)
    if outcome["event"] != "done":
        reason = outcome.get("message") or f"the fuse worker ended with status {code}"
        raise ModelLoadFailed(reason, model=name, reason=outcome.get("data", {}).get("reason", "worker"))
    path = Path(outcome["path"])
    config = await asyncio.to_thread(read_config, path)
    return {"model": name, "path": str(path), "bytes": await asyncio.to_thread(tree_bytes, path),
            "quantization": quantization(config or {}), "seconds": round(outcome["seconds"], 3)}
