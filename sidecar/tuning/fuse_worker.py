"""The fuse task of the tuning worker (see worker.py), started by models/fuse.

mlx-lm's fuse, as `mlx_lm.fuse` runs it: the base loaded with the adapter, each adapted
layer folded back into a plain one (`fuse`), optionally quantized, saved with mlx-lm's own
`save`. Written to a hidden folder beside its destination, then renamed into place.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .worker_io import Cancelled, WorkerIO

FAILED = (-32013, "Fuse failed")


def fuse(io: WorkerIO, spec: dict[str, Any]) -> None:
    try:
        _fuse(io, spec)
    except Cancelled:
        io.send("cancelled")


def _fuse(io: WorkerIO, spec: dict[str, Any]) -> None:
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model, quantize_model, save

    from .adapters import publish

    began = time.perf_counter()
    io.send("phase", phase="load")
    model, tokenizer, config = load(spec["model_path"], adapter_path=spec["adapter_path"], return_config=True)  # type: ignore[misc]
    io.send("phase", phase="fuse")
    fused = [(name, module.fuse(dequantize=spec["dequantize"])) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if spec["dequantize"]:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    quantize = spec["quantize"]
    if quantize:
        model, config = quantize_model(model, config, quantize.get("groupSize", 64), quantize["bits"])
    io.send("phase", phase="save")
    final = Path(spec["final_dir"])
    staged = final.with_name(f".{final.name}.staged-{os.getpid()}")
    save(staged, spec["model_path"], model, tokenizer, config, donate_model=False)
    publish(staged, final, spec["overwrite"])
    io.send("done", path=str(final), quantization=config.get("quantization"), seconds=time.perf_counter() - began)
