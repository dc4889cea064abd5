"""The training task of the tuning worker (see worker.py), started by models/finetune.

It checks the dataset (every error before any training), then trains with mlx-lm's own
tuner (`linear_to_lora_layers`, `trainer.train`, its datasets), in a run directory under
adapters/.runs/. Every `save_every` iterations it writes a checkpoint in one rename, so a
checkpoint on disk is always complete. When done it publishes the adapter, again in one
rename, as adapters/<name>: an adapter directory is there whole or not at all.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import orjson
from mlx.utils import tree_flatten
from mlx_lm.tuner import trainer
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_model, load_tokenizer

from ..errors import InvalidParams
from .adapters import CHECKPOINT, CHECKPOINT_STATE, CONFIG_FILE, TRAINING_FILE, WEIGHTS_FILE, last_checkpoint, publish
from .datasets import read_dataset
from .worker_io import Cancelled, WorkerIO


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def save_checkpoint(run: Path, model: Any, iteration: int) -> None:
    partial = run / (CHECKPOINT + ".partial.safetensors")
    mx.save_safetensors(str(partial), dict(tree_flatten(model.trainable_parameters())))
    os.replace(partial, run / CHECKPOINT)
    write_atomically(run / CHECKPOINT_STATE, orjson.dumps({"iteration": iteration}))


class Reporter(TrainingCallback):
    """mlx-lm's reports, as events (the sidecar turns them into $/progress)."""

    def __init__(self, io: WorkerIO, start: int, total: int) -> None:
        self.io = io
        self.start, self.total = start, total
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.tokens = 0
        self.tokens_per_second = 0.0
        self.began = time.perf_counter()

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        iteration = self.start + int(info["iteration"])
        self.train_loss, self.tokens = float(info["train_loss"]), int(info["trained_tokens"])
        self.tokens_per_second = float(info["tokens_per_second"])
        rate = (iteration - self.start) / max(time.perf_counter() - self.began, 1e-9)
        self.io.send("train", iteration=iteration, total=self.total, trainLoss=self.train_loss, valLoss=self.val_loss,
                tokensPerSecond=self.tokens_per_second, peakMemoryBytes=mx.get_peak_memory(),
                learningRate=float(info["learning_rate"]), etaSeconds=(self.total - iteration) / rate if rate else None)

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        self.val_loss = float(info["val_loss"])
        self.io.send("val", iteration=self.start + int(info["iteration"]), total=self.total, valLoss=self.val_loss)


def checkpointing_batches(io: WorkerIO, model: Any, run: Path, start: int, save_every: int, seed: int):  # type: ignore[no-untyped-def]
    """mlx-lm's iterate_batches, which also marks the end of each training iteration: a
    checkpoint is written and a stop request honoured there, between two steps."""
    def batches(dataset: Any, batch_size: int, max_seq_length: int, loop: bool = False, seed_: int | None = None,
                comm_group: Any = None) -> Iterator[Any]:
        inner = trainer.iterate_batches(dataset, batch_size, max_seq_length, loop=loop,
                                        seed=seed + start if loop else seed_, comm_group=comm_group)
        if not loop:  # a validation pass
            yield from inner
            return
        for done, batch in enumerate(inner):
            if done and done % save_every == 0:
                save_checkpoint(run, model, start + done)
                io.send("checkpoint", iteration=start + done)
            if io.stop_requested.is_set():
                raise Cancelled
            yield batch

    return batches


FAILED = (-32020, "Fine-tuning failed")


def train(io: WorkerIO, spec: dict[str, Any]) -> None:
    try:
        _train(io, spec)
    except Cancelled:
        io.send("cancelled", checkpoint=last_checkpoint(Path(spec["run_dir"])))


def _train(io: WorkerIO, spec: dict[str, Any]) -> None:
    run, final = Path(spec["run_dir"]), Path(spec["final_dir"])
    io.send("phase", phase="validate")
    tokenizer = load_tokenizer(Path(spec["model_path"]))
    records = read_dataset(Path(spec["dataset"]), tokenizer, max_seq_length=spec["max_seq_length"],
                           validation_split=spec["validation_split"], seed=spec["seed"], batch_size=spec["batch_size"])
    if spec["mask_prompt"] and records.format == "text":
        raise InvalidParams("maskPrompt needs a prompt to mask: use chat or completions records, not text",
                            errors=[{"path": "/maskPrompt", "message": "the dataset is text"}])
    iterations = spec["iterations"] or max(1, math.ceil(spec["epochs"] * len(records.train) / spec["batch_size"]))
    start = last_checkpoint(run) if spec["resume"] else None
    io.send("dataset", format=records.format, train=len(records.train), valid=len(records.valid),
            iterations=iterations, resumedFrom=start)

    io.send("phase", phase="load")
    np.random.seed(spec["seed"])
    model, _ = load_model(Path(spec["model_path"]))
    mx.random.seed(spec["seed"])  # here, as mlx_lm.lora does: the adapter starts as its would
    model.freeze()
    lora = {"rank": spec["rank"], "dropout": spec["dropout"], "scale": spec["scale"]}
    linear_to_lora_layers(model, spec["num_layers"], lora, use_dora=spec["fine_tune_type"] == "dora")
    run.mkdir(parents=True, exist_ok=True)
    if start is not None:
        model.load_weights(str(run / CHECKPOINT), strict=False)
    first = start or 0
    if first >= iterations:
        raise ValueError(f"the checkpoint is at iteration {first}, not before the last ({iterations})")

    config = SimpleNamespace(mask_prompt=spec["mask_prompt"])
    train_set = CacheDataset(create_dataset(records.train, tokenizer, config))
    valid_set = CacheDataset(create_dataset(records.valid, tokenizer, config)) if records.valid else None
    reporter = Reporter(io, first, iterations)
    args = trainer.TrainingArgs(
        batch_size=spec["batch_size"], iters=iterations - first, val_batches=spec["val_batches"],
        steps_per_report=spec["steps_per_report"], steps_per_eval=spec["steps_per_eval"],
        steps_per_save=iterations + 1,  # checkpoints are written by checkpointing_batches, whole
        adapter_file=str(run / WEIGHTS_FILE), max_seq_length=spec["max_seq_length"],
        grad_checkpoint=spec["grad_checkpoint"])
    io.send("phase", phase="train")
    began = time.perf_counter()
    io.interruptible = False  # from here a stop is honoured between two steps
    trainer.train(model, optim.Adam(learning_rate=spec["learning_rate"]), train_set, valid_set, args=args,
                  iterate_batches=checkpointing_batches(io, model, run, first, spec["save_every"], spec["seed"]),
                  training_callback=reporter)
    seconds = time.perf_counter() - began

    io.send("phase", phase="save")
    adapter_config = {"fine_tune_type": spec["fine_tune_type"], "num_layers": spec["num_layers"],
                      "lora_parameters": lora, "model": spec["model"]}
    summary = {"model": spec["model"], "dataset": spec["dataset"], "datasetFormat": records.format,
               "trainExamples": len(records.train), "validExamples": len(records.valid),
               "fineTuneType": spec["fine_tune_type"], "rank": spec["rank"], "numLayers": spec["num_layers"],
               "iterations": iterations, "batchSize": spec["batch_size"], "learningRate": spec["learning_rate"],
               "maxSeqLength": spec["max_seq_length"], "seed": spec["seed"], "trainLoss": reporter.train_loss,
               "valLoss": reporter.val_loss, "trainedTokens": reporter.tokens, "seconds": round(seconds, 3),
               "resumedFrom": start}
    staged = final.with_name(f".{final.name}.staged-{os.getpid()}")
    staged.mkdir(parents=True)
    os.replace(run / WEIGHTS_FILE, staged / WEIGHTS_FILE)
    write_atomically(staged / CONFIG_FILE, orjson.dumps(adapter_config, option=orjson.OPT_INDENT_2))
    write_atomically(staged / TRAINING_FILE, orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    publish(staged, final, spec["overwrite"])
    io.send("done", training=summary, path=str(final), peakMemoryBytes=mx.get_peak_memory(),
            tokensPerSecond=reporter.tokens_per_second)
