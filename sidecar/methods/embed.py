"""embed: vectors for texts, from an embedding model held by the same engine and memory
budget as the chat models."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..embeddings.detect import embedding_kind
from ..errors import InvalidParams
from ..inflight import InFlightRequest
from ..settings import parse_duration
from .table import rpc_method


def _cannot_embed(name: str) -> InvalidParams:
    return InvalidParams(f"Model {name} cannot embed: it is a text-generation model (use an embedding "
                         "model such as all-MiniLM-L6-v2 or Qwen3-Embedding)",
                         errors=[{"path": "/model", "message": "not an embedding model"}], model=name)


@rpc_method("embed")
async def embed(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    """A cancel stops it between micro-batches (-32800, or -32802 by the server)."""
    engine = context.engine
    location, _ = await engine.resolve_named(params.get("model"))
    context.model = location.name
    with engine.holding(location.name):
        if (not engine.registry.is_loaded(location.name) and location.path is not None
                and await asyncio.to_thread(embedding_kind, location.path, location.name) is None):
            raise _cannot_embed(location.name)  # before spending a load on it
        loaded = await engine.ensure_loaded(location, context.progress)
        if loaded.embedder is None:
            raise _cannot_embed(loaded.name)
        size = loaded.embedder.dimensions
        dimensions = params.get("dimensions", size)
        if dimensions > size:
            raise InvalidParams(f"dimensions {dimensions} is more than the model's {size}",
                                errors=[{"path": "/dimensions", "message": f"at most {size}"}],
                                model=loaded.name, maxDimensions=size)
        work = await engine.prepare_embedding(loaded, params["input"], dimensions, params.get("normalize", True),
                                              context.progress)
        keep_alive = params.get("keepAlive")  # as for generations: it becomes the model's
        job = engine.submit_embedding(work, loaded.name, None if keep_alive is None else parse_duration(keep_alive))
        result = await context.outcome_of(job, engine.cancel)
    result["timings"]["totalMs"] = round((time.perf_counter() - context.received_at) * 1000, 3)
    return result
