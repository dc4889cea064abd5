"""One memory budget for all loaded models.

What a load needs is read from the safetensors headers before anything is allocated; room
is made by unloading idle models, least recently used first (never one with work on it);
a load that cannot fit is refused with the numbers that say why.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadFailed, OutOfMemory

if TYPE_CHECKING:
    from .registry import LoadedModel

DEFAULT_SHARE = 0.7  # of physical memory, when LOCALMLX_MEMORY_BUDGET is not set


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume a small machine
        return 8 << 30


def default_budget_bytes() -> int:
    """70% of physical memory; on Apple silicon no more than Metal's recommended working set."""
    budget = int(physical_memory_bytes() * DEFAULT_SHARE)
    try:
        import mlx.core as mx

        recommended = mx.device_info().get("max_recommended_working_set_size")
        if isinstance(recommended, int) and recommended > 0:
            budget = min(budget, recommended)
    except Exception:  # no device info on this backend
        pass
    return budget


def weight_bytes(model_dir: Path) -> int:
    """Bytes the weights take once loaded, from the safetensors headers alone; a file whose
    header promises more data than it holds (a truncated download) fails here, before any
    model has been unloaded to make room for it."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadFailed(f"No weights (*.safetensors) in {model_dir}", model=model_dir.name,
                              reason="no weights")
    return sum(tensor_bytes(path) for path in files)


def tensor_bytes(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:
                raise ValueError("header length is implausible")
            header: dict[str, Any] = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelLoadFailed(f"Unreadable weights file {path.name}: {exc}", model=path.parent.name,
                              reason="unreadable weights") from None
    if 8 + length + end > path.stat().st_size:
        raise ModelLoadFailed(f"Weights file {path.name} is truncated ({path.stat().st_size} of "
                              f"{8 + length + end} bytes)", model=path.parent.name, reason="truncated weights")
    return end


def models_to_unload(required: int, budget: int, loaded: Iterable[LoadedModel],
                     busy: set[str]) -> list[LoadedModel]:
    """The idle models to unload, least recently used first, so that `required` more bytes
    fit in `budget`; OutOfMemory when even unloading every idle one is not enough."""
    models = list(loaded)
    in_use = sum(m.bytes for m in models)
    if in_use + required <= budget:
        return []
    idle = sorted((m for m in models if m.name not in busy), key=lambda m: m.last_used)
    chosen, freed = [], 0
    for model in idle:
        chosen.append(model)
        freed += model.bytes
        if in_use - freed + required <= budget:
            return chosen
    available = budget - (in_use - freed)
    raise OutOfMemory(f"Not enough memory: the model needs {required} bytes and {max(available, 0)} of the "
                      f"{budget}-byte budget can be freed (models with work on them stay loaded)",
                      requiredBytes=required, availableBytes=max(available, 0), budgetBytes=budget)
