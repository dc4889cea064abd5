"""What mx.distributed.init reads, for one rank: the same description on every host, written
into files and variables where this process runs (as mlx.launch does)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from .hostfile import GroupSpec


def backend_env(spec: GroupSpec) -> dict[str, Any]:
    """{"files": {VARIABLE: content}, "env": {VARIABLE: value}} for every rank."""
    if spec.backend == "ring":
        return {"files": {"MLX_HOSTFILE": spec.ring_hostfile()}, "env": {}}
    return {"files": {"MLX_IBV_DEVICES": spec.rdma_devices()},
            "env": {"MLX_JACCL_COORDINATOR": f"{spec.hosts[0].address}:{spec.port}"}}


def apply_backend_env(description: dict[str, Any], rank: int) -> None:
    os.environ["MLX_RANK"] = str(rank)
    for name, content in description["files"].items():
        handle, path = tempfile.mkstemp(prefix="localmlx-group-", suffix=".json")
        with os.fdopen(handle, "w") as f:
            f.write(content)
        os.environ[name] = path
    os.environ.update(description["env"])


def init_world(backend: str, size: int) -> Any:
    import mlx.core as mx

    world = mx.distributed.init(backend=backend, strict=True)
    if world.size() != size:
        raise RuntimeError(f"mlx.distributed formed a group of {world.size()}, not {size}")
    return world
