"""models/finetune on the sidecar's side: check the request, count the run's memory
against the budget, start the training worker, turn its events into `$/progress`, stop it
on cancel, and answer with what it made.

One run at a time: training takes every core it is given and most of the memory bandwidth,
and a second run would only slow both while the engine serves.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import anyio

from ..embeddings.detect import embedding_kind
from ..errors import Busy, InvalidParams, OutOfMemory, TrainingFailed
from ..inflight import InFlightRequest
from ..model_config import context_length, read_config
from .adapters import RUNS_DIRNAME, adapters_dir, last_checkpoint, name_from, variant_name
from .workers import Worker

log = logging.getLogger("localmlx.tuning")

DEFAULTS: dict[str, Any] = {"fineTuneType": "lora", "rank": 8, "scale": 20.0, "dropout": 0.0, "numLayers": 16, "learningRate": 1e-5,
            "batchSize": 4, "maxSeqLength": 2048, "validationSplit": 0.1, "stepsPerEval": 50, "valBatches": 25,
            "saveEvery": 50, "gradCheckpoint": False, "maskPrompt": False, "seed": 0, "keepCheckpoint": False,
            "resume": False, "overwrite": False}
DEFAULT_ITERATIONS = 100

_running: set[str] = set()  # adapter names being trained (one run at a time, see above)


def _invalid(message: str, path: str, **data: Any) -> InvalidParams:
    return InvalidParams(message, errors=[{"path": path, "message": message}], **data)


def default_name(dataset: Path) -> str:
    return name_from(dataset.stem if dataset.is_file() else dataset.name) or "adapter"


def estimate_bytes(config: dict[str, Any], weights: int, spec: dict[str, Any]) -> int:
    """What training needs, besides what the engine holds: a copy of the base weights (the
    worker is a process of its own), the adapter's weights, gradients and Adam's two moments
    in fp32, and the activations kept for the backward pass (fp32, per adapted layer, and
    the logits). An estimate on the safe side: the worker reports what it really peaked at."""
    hidden = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    vocab = int(config.get("vocab_size") or 0)
    layers = int(config.get("num_hidden_layers") or 1)
    adapted = layers if spec["num_layers"] < 0 else min(spec["num_layers"], layers)
    adapter = adapted * spec["rank"] * (8 * hidden + 3 * (hidden + inter)) * 4 * 4
    kept = 2 if spec["grad_checkpoint"] else layers
    tokens = spec["batch_size"] * spec["max_seq_length"]
    activations = tokens * (kept * (16 * hidden + 4 * inter) + 3 * vocab) * 4
    return int(weights + adapter + activations)


async def finetune(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    from ..engine.budget import weight_bytes  # the engine's own count of a model's bytes

    engine = context.engine
    base = await engine.resolve(params["model"])
    if base.adapter is not None:
        raise _invalid(f"{base.name} already has an adapter: train on its base model", "/model", model=base.name)
    locator = engine.locator
    dataset = await asyncio.to_thread(locator.inside_roots, params["dataset"], "dataset")
    if not dataset.exists():
        raise _invalid(f"Dataset not found: {params['dataset']}", "/dataset", dataset=params["dataset"])
    options = {**DEFAULTS, **params}
    name = options.get("name") or default_name(dataset)
    root = adapters_dir(locator.models_dir)
    final, run = root / name, root / RUNS_DIRNAME / name
    if name in _running:
        raise Busy(f"Adapter {name} is being trained already", adapter=name)
    if _running:
        raise Busy(f"A fine-tuning run is going ({', '.join(sorted(_running))}): one at a time", training=sorted(_running))
    if final.exists() and not options["overwrite"]:
        raise _invalid(f"An adapter named {name} exists: choose another name or pass overwrite", "/name", adapter=name)
    if options["resume"] and last_checkpoint(run) is None:
        raise _invalid(f"No checkpoint of a run named {name} to resume (keepCheckpoint keeps one)", "/resume",
                       adapter=name)

    model_path = await asyncio.to_thread(locator.materialize, base, context.progress)
    if embedding_kind(model_path, base.name) is not None:
        raise _invalid(f"{base.name} is an embedding model: only text-generation models are fine-tuned", "/model",
                       model=base.name)
    config = await asyncio.to_thread(read_config, model_path) or {}
    layers = int(config.get("num_hidden_layers") or 0)
    num_layers = options["numLayers"] if "numLayers" in params else min(DEFAULTS["numLayers"], layers or 16)
    if layers and num_layers > layers:
        raise _invalid(f"numLayers {num_layers} is more than the {layers} layers of {base.name}", "/numLayers")
    limit = context_length(config)
    spec = {"model": base.name, "model_path": str(model_path), "dataset": str(dataset), "run_dir": str(run),
            "final_dir": str(final), "overwrite": options["overwrite"], "resume": options["resume"],
            "fine_tune_type": options["fineTuneType"], "rank": options["rank"], "scale": options["scale"],
            "dropout": options["dropout"], "num_layers": num_layers,
            "iterations": params.get("iterations", None if "epochs" in params else DEFAULT_ITERATIONS),
            "epochs": params.get("epochs"), "learning_rate": options["learningRate"],
            "batch_size": options["batchSize"],
            "max_seq_length": min(options["maxSeqLength"], limit) if limit else options["maxSeqLength"],
            "validation_split": options["validationSplit"], "steps_per_eval": options["stepsPerEval"],
            "val_batches": options["valBatches"], "save_every": options["saveEvery"],
            "grad_checkpoint": options["gradCheckpoint"], "mask_prompt": options["maskPrompt"], "seed": options["seed"]}
    spec["steps_per_report"] = max(1, min(10, (spec["iterations"] or 100) // 20))
    required = estimate_bytes(config, await asyncio.to_thread(weight_bytes, model_path), spec)
    residency = engine.residency
    available = engine.unreserved_bytes()
    if required > available:
        raise OutOfMemory(f"Not enough memory to fine-tune {base.name}: the run needs about {required} bytes and "
                          f"{max(available, 0)} of the {engine.memory_budget()}-byte budget are free (unload models, "
                          f"or lower batchSize / maxSeqLength, or set gradCheckpoint)",
                          requiredBytes=required, availableBytes=max(available, 0), budgetBytes=engine.memory_budget(),
                          loadedModels=engine.registry.names())

    _running.add(name)
    residency.reserved_bytes += required
    try:
        if run.exists() and not options["resume"]:
            await asyncio.to_thread(shutil.rmtree, run, True)  # an earlier run's kept checkpoint: starting over
        return await _train(context, spec, name, options["keepCheckpoint"])
    finally:
        residency.reserved_bytes -= required
        _running.discard(name)


async def _train(context: InFlightRequest, spec: dict[str, Any], name: str, keep_checkpoint: bool) -> dict[str, Any]:
    worker = await Worker.start("train", spec, context.settings.blas)
    outcome: dict[str, Any] | None = None
    try:
        outcome = await _follow(context, worker)
    finally:
        with anyio.CancelScope(shield=True):  # a cancel stops the worker first, then answers
            code = await worker.stop()
            if (outcome is None or outcome["event"] != "done") and not keep_checkpoint:
                await asyncio.to_thread(shutil.rmtree, Path(spec["run_dir"]), True)
            context.cancelled_data = {"adapter": name, "checkpoint": last_checkpoint(Path(spec["run_dir"]))}
    assert outcome is not None
    if outcome["event"] == "done":
        await asyncio.to_thread(shutil.rmtree, Path(spec["run_dir"]), True)
        return {"adapter": name, "model": variant_name(spec["model"], name), "path": outcome["path"],
                "base": spec["model"], "training": outcome["training"],
                "peakMemoryBytes": int(outcome["peakMemoryBytes"]), "tokensPerSecond": outcome["tokensPerSecond"]}
    if outcome["event"] == "error" and outcome["code"] != TrainingFailed.code:
        raise InvalidParams(outcome["message"], **outcome.get("data", {}))
    checkpoint = last_checkpoint(Path(spec["run_dir"])) if keep_checkpoint else None
    reason = outcome.get("message") or (f"the trainer was killed by signal {-code}" if code < 0
                                         else f"the trainer exited with status {code}")
    raise TrainingFailed(reason if reason.startswith("Fine-tuning failed") else f"Fine-tuning failed: {reason}",
                         reason=reason, exitCode=code, checkpoint=checkpoint)


async def _follow(context: InFlightRequest, worker: Worker) -> dict[str, Any]:
    """The worker's events as `$/progress`, until its last: done, error or cancelled (or
    none, when it died)."""
    progress = context.progress
    last: dict[str, Any] = {"event": "died"}
    dataset: dict[str, Any] = {}
    async for event in worker.events():
        kind = event["event"]
        if kind == "dataset":
            dataset = event
        elif kind == "phase" and event["phase"] == "train":  # counted in iterations from here
            progress("train", dataset.get("resumedFrom") or 0, dataset.get("iterations"), "iteration")
        elif kind == "phase":
            progress(event["phase"], 0, None, "step")
        elif kind in ("train", "val"):
            progress("train", event["iteration"], event["total"], "iteration", iteration=event["iteration"],
                     trainLoss=event.get("trainLoss"), valLoss=event.get("valLoss"),
                     tokensPerSecond=event.get("tokensPerSecond"), peakMemoryBytes=event.get("peakMemoryBytes"),
                     etaSeconds=event.get("etaSeconds"))
        elif kind == "checkpoint":
            log.info("checkpoint at iteration %d", event["iteration"])
        elif kind in ("done", "error", "cancelled"):
            last = event
    return last
