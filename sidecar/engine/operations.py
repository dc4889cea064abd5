"""The engine operations that a sharded model's followers replay (see sidecar.distributed):
plain JSON objects, built here on rank 0 where each decision is taken."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

from ..hub import ModelLocation
from .generation import GenerationRequest, PreparedGeneration
from .jobs import CancelReason
from .registry import ModelOptions
from .sampling import SamplingParams

Operation = dict[str, Any]

# What a follower needs of a request: all of it but when it arrived here, its sampling
# (sent apart) and its progress reporter (rank 0 reports).
REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest)
                       if f.name not in ("received_at", "sampling", "progress"))


class Mirror(Protocol):
    """Where rank 0's engine sends each operation, in order (the group's followers)."""

    def send(self, op: Operation) -> None: ...


def admit(seq: int, model: str, prepared: PreparedGeneration) -> Operation:
    request = prepared.request
    sampling = dataclasses.asdict(request.sampling)
    if sampling["logit_bias"]:
        sampling["logit_bias"] = {str(k): v for k, v in sampling["logit_bias"].items()}
    fields = {name: getattr(request, name) for name in REQUEST_FIELDS}
    return {"op": "admit", "seq": seq, "model": model, "request": fields | {"sampling": sampling},
            "prompt": prepared.prompt, "maxTokens": prepared.max_tokens, "drawSeed": prepared.draw_seed}


def request_of(fields: dict[str, Any], received_at: float) -> GenerationRequest:
    """The request an admit operation carries, as the follower rebuilds it."""
    fields = dict(fields)
    sampling = dict(fields.pop("sampling"))
    if sampling.get("logit_bias"):
        sampling["logit_bias"] = {int(k): v for k, v in sampling["logit_bias"].items()}
    return GenerationRequest(received_at=received_at, sampling=SamplingParams(**sampling), **fields)


def cancel(seq: int, reason: CancelReason) -> Operation:
    return {"op": "cancel", "seq": seq, "reason": reason.value}


def turn(lanes: list[str]) -> Operation:
    """Settle what no step will see, then step these lanes, in this order."""
    return {"op": "turn", "lanes": lanes}


def load(location: ModelLocation, path: Path, options: ModelOptions) -> Operation:
    return {"op": "load", "name": location.name, "path": str(path), "repo": location.repo_id,
            "options": dataclasses.asdict(options)}


def unload(name: str, reason: CancelReason) -> Operation:
    return {"op": "unload", "name": name, "reason": reason.value}


def options(name: str, value: ModelOptions) -> Operation:
    return {"op": "options", "name": name, "options": dataclasses.asdict(value)}
