#!/usr/bin/env python3
"""Fine-tuning and adapters: the sidecar's models/finetune beside mlx-lm's own LoRA training on
the same model, data and settings, and the decode speed of base + adapter against the base
alone and against the fused model.

Model: a bench-sized fp32 llama built offline like the demo model (hidden 512, 8 layers, ~24M
parameters); data: text records cut from the demo corpus (40 words each; 64 to train, 8 to validate).

- `training`: each round runs both sides once, in rotated order, each in a fresh process:
  `sidecar` (models/finetune over the protocol; training runs in its worker process) and
  `mlx_lm.lora` (mlx-lm's `lora.train_model`, which `mlx_lm.lora --train` runs, after loading
  the model and the data as it does). The same settings (LoRA rank 8 on every layer, batch 4,
  learning rate 1e-4, seed 0, a report every 2 iterations); OpenBLAS preloaded on both sides.
  Tokens/s is the median of each side's reports (mlx-lm's own tokens/s per report, the first
  left out: compilation); peak memory is MLX's peak in the training process; losses are the
  final train and validation losses (with the same seed both sides start from the same adapter).
- `decode`: one sidecar serves the base, base+adapter and the fused model (models/fuse); each
  round generates `--max-tokens` greedy tokens on each, in rotated order; figures are the
  medians of the engine's decode tokens/s (`timings.tokensPerSecond`).

    .venv/bin/python scripts/bench.py --finetune [--quick] [--rounds 3] [--iterations 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench import Report, load_average, optimized_blas_library, print_table, progress, write_json

from sidecar.client import SidecarClient, sidecar_command
from sidecar.demo_model import ModelShape, build_demo_model

SHAPE = ModelShape(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376)
MODEL = "bench-lora"
SETTINGS = {"rank": 8, "numLayers": -1, "batchSize": 4, "learningRate": 1e-4, "seed": 0, "maxSeqLength": 2048,
            "stepsPerEval": 1000, "valBatches": 2}
REPORT_EVERY = 2  # the sidecar reports every max(1, min(10, iterations // 20)) iterations: 2 for 40

MLX_LM_SIDE = r"""
import json, sys, types
from sidecar.blas import use_best_blas
use_best_blas("auto")
import mlx.core as mx
from mlx_lm import load, lora
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import load_dataset
settings = json.loads(sys.argv[1])
args = types.SimpleNamespace(**{**lora.CONFIG_DEFAULTS, **settings})
reports, vals = [], []
class Record(TrainingCallback):
    def on_train_loss_report(self, info): reports.append(info)
    def on_val_loss_report(self, info): vals.append(info["val_loss"])
import numpy as np
np.random.seed(args.seed)
model, tokenizer = load(args.model)
train_set, valid_set, _ = load_dataset(args, tokenizer)
lora.train_model(args, model, train_set, valid_set, Record())
print(json.dumps({"reports": reports, "vals": vals, "peak": mx.get_peak_memory()}))
"""


def build(models_dir: Path) -> tuple[Path, Path]:
    model = build_demo_model(models_dir / MODEL, SHAPE)
    data = models_dir / "bench-lora-data"
    data.mkdir(exist_ok=True)
    words = (REPO / "sidecar" / "demo_corpus.txt").read_text(encoding="utf-8").split()
    records = [json.dumps({"text": " ".join(words[i * 40:(i + 1) * 40])}) for i in range(72)]
    (data / "train.jsonl").write_text("\n".join(records[:64]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(records[64:]) + "\n")
    return model, data


def sidecar_env(models_dir: Path, data: Path) -> dict[str, str]:
    return {**os.environ, "LOCALMLX_MODELS_DIR": str(models_dir), "LOCALMLX_ALLOWED_ROOTS": str(data),
            "HF_HUB_OFFLINE": "1", "LOCALMLX_BLAS": "auto", "LOCALMLX_LOG_LEVEL": "WARNING"}


def train_sidecar(models_dir: Path, data: Path, iterations: int, name: str) -> dict[str, Any]:
    reports: list[dict[str, Any]] = []

    def on_notification(message: dict[str, Any]) -> None:
        params = message.get("params") or {}
        if message.get("method") == "$/progress" and params.get("phase") == "train" and "tokensPerSecond" in params:
            reports.append(params)

    with SidecarClient(sidecar_command(), env=sidecar_env(models_dir, data), on_notification=on_notification) as client:
        client.initialize(name="bench")
        result = client.request("models/finetune", {"model": MODEL, "dataset": str(data), "name": name,
                                                    "iterations": iterations, "overwrite": True, **SETTINGS,
                                                    "_meta": {"progressToken": "bench"}}, timeout=3600)
    speeds = [r["tokensPerSecond"] for r in reports[1:]] or [r["tokensPerSecond"] for r in reports]
    return {"tokensPerSecond": median(speeds), "peakBytes": result["peakMemoryBytes"],
            "trainLoss": result["training"]["trainLoss"], "valLoss": result["training"]["valLoss"]}


def train_mlx_lm(model: Path, data: Path, iterations: int, adapter_path: Path) -> dict[str, Any]:
    settings = {"model": str(model), "data": str(data), "train": True, "iters": iterations, "num_layers": -1,
                "batch_size": SETTINGS["batchSize"], "learning_rate": SETTINGS["learningRate"], "seed": 0,
                "max_seq_length": SETTINGS["maxSeqLength"], "steps_per_report": REPORT_EVERY,
                "steps_per_eval": SETTINGS["stepsPerEval"], "val_batches": SETTINGS["valBatches"],
                "adapter_path": str(adapter_path), "save_every": 10**6,
                "lora_parameters": {"rank": SETTINGS["rank"], "dropout": 0.0, "scale": 20.0}}
    out = subprocess.run([sys.executable, "-c", MLX_LM_SIDE, json.dumps(settings)], cwd=REPO, check=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    reports = found["reports"]
    speeds = [r["tokens_per_second"] for r in reports[1:]] or [r["tokens_per_second"] for r in reports]
    return {"tokensPerSecond": median(speeds), "peakBytes": found["peak"], "trainLoss": reports[-1]["train_loss"],
            "valLoss": found["vals"][-1] if found["vals"] else None}


def decode_speeds(models_dir: Path, data: Path, rounds: int, max_tokens: int) -> dict[str, list[float]]:
    speeds: dict[str, list[float]] = {}
    with SidecarClient(sidecar_command(), env=sidecar_env(models_dir, data)) as client:
        client.initialize(name="bench")
        fused = client.request("models/fuse", {"model": MODEL, "adapter": "bench", "name": "bench-lora-fused",
                                               "overwrite": True})["model"]
        sides = [MODEL, f"{MODEL}+bench", fused]
        for side in sides:
            client.request("models/load", {"model": side})
        for r in range(rounds + 1):  # round 0 warms every side up, unmeasured
            for side in sides[r % 3:] + sides[:r % 3]:
                result = client.request("generate", {"model": side, "prompt": f"Round {r}: the sea was",
                                                     "maxTokens": max_tokens, "temperature": 0, "cache": False})
                if r:
                    speeds.setdefault(side, []).append(result["timings"]["tokensPerSecond"])
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, 10 iterations, 64 tokens (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--models-dir", type=Path, default=Path("~/.cache/localmlx/bench").expanduser())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rounds, iterations, max_tokens = (1, 10, 64) if args.quick else (args.rounds, args.iterations, args.max_tokens)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    model, data = build(args.models_dir)
    report = Report(context={"model": f"{MODEL} (fp32 llama, hidden 512, 8 layers)", "rounds": rounds,
                             "iterations": iterations, "blas": optimized_blas_library() or "bundled",
                             "load": load_average()})
    runs: dict[str, list[dict[str, Any]]] = {"sidecar": [], "mlx_lm.lora": []}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(rounds):
            order = ["sidecar", "mlx_lm.lora"][r % 2:] + ["sidecar", "mlx_lm.lora"][:r % 2]
            for side in order:
                progress(f"round {r + 1}/{rounds}: {side}")
                runs[side].append(train_sidecar(args.models_dir, data, iterations, "bench") if side == "sidecar"
                                  else train_mlx_lm(model, data, iterations, Path(scratch) / f"a{r}"))
    report.raw["training"] = runs

    def med(side: str, key: str) -> float:
        return median(run[key] for run in runs[side])

    ratio = median(s["tokensPerSecond"] / m["tokensPerSecond"] for s, m in zip(runs["sidecar"], runs["mlx_lm.lora"], strict=True))
    report.add("training", "sidecar tokens/s", med("sidecar", "tokensPerSecond"), "tok/s")
    report.add("training", "mlx_lm.lora tokens/s", med("mlx_lm.lora", "tokensPerSecond"), "tok/s")
    report.add_at_least("training", "sidecar / mlx_lm.lora tokens/s", ratio, 0.95, "x")
    report.add("training", "sidecar peak memory", med("sidecar", "peakBytes") / 2**20, "MiB")
    report.add("training", "mlx_lm.lora peak memory", med("mlx_lm.lora", "peakBytes") / 2**20, "MiB")
    for key in ("trainLoss", "valLoss"):
        ours, theirs = runs["sidecar"][-1][key], runs["mlx_lm.lora"][-1][key]
        report.add("training", f"{key}: sidecar / mlx_lm.lora", f"{ours:.4f} / {theirs:.4f}")
        report.add_at_most("training", f"{key} difference", abs(ours - theirs), 0.05, "")

    progress("decode: base, base+adapter, fused")
    speeds = decode_speeds(args.models_dir, data, rounds, max_tokens)
    report.raw["decode"] = speeds
    base, adapter, fused = (median(v) for v in speeds.values())
    report.add("decode", "base tokens/s", base, "tok/s")
    report.add("decode", "base+adapter tokens/s", adapter, "tok/s")
    report.add("decode", "fused tokens/s", fused, "tok/s")
    report.add("decode", "base+adapter / base", adapter / base, "x")
    report.add("decode", "base+adapter / fused", adapter / fused, "x")
    print_table(report)
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
