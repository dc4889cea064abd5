"""`localmlx models …` and the REPL's /rm: the model cache from a shell, through a sidecar."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from sidecar.demo_model import DEMO_MODEL_DIRNAME
from sidecar.protocol_defs import INVALID_PARAMS, MODEL_NOT_FOUND

from .tuning_models import LEARNER, build_learner, build_random_adapter, write_fact_dataset


def localmlx(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", "models", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, stdin=subprocess.DEVNULL)


def test_list_status_and_rm(sidecar_env, models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / DEMO_MODEL_DIRNAME, models / DEMO_MODEL_DIRNAME)
    shutil.copytree(models_dir / DEMO_MODEL_DIRNAME, models / "team" / "copy")
    env = {**sidecar_env, "LOCALMLX_MODELS_DIR": str(models)}

    listed = localmlx(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {m["model"]: m for m in json.loads(listed.stdout)["models"]}
    assert by_name["team/copy"]["type"] == "llama" and by_name["team/copy"]["source"] == "models-dir"
    table = localmlx(env, "list")
    assert "team/copy" in table.stdout and "llama" in table.stdout and "{" not in table.stdout

    assert "available" in localmlx(env, "status", "team/copy").stdout
    removed = localmlx(env, "rm", "team/copy")
    assert removed.returncode == 0 and "deleted team/copy" in removed.stdout and "freed" in removed.stdout
    assert not (models / "team").exists()  # the empty owner folder went too

    missing = localmlx(env, "rm", "team/copy")
    assert missing.returncode == 1 and str(MODEL_NOT_FOUND) in missing.stderr


def test_the_repl_removes_a_model(sidecar_env, models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / DEMO_MODEL_DIRNAME, models / DEMO_MODEL_DIRNAME)
    shutil.copytree(models_dir / DEMO_MODEL_DIRNAME, models / "spare")
    done = subprocess.run([sys.executable, "-m", "sidecar", "repl", "--no-load"], input="/rm spare\n/models\n",
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **sidecar_env, "LOCALMLX_MODELS_DIR": str(models)})
    assert done.returncode == 0, done.stderr
    assert "deleted spare" in done.stderr + done.stdout
    assert not (models / "spare").exists()


# ---- adapters: `localmlx finetune`, `models fuse`, adapters in `models list`, `models rm --adapter` ----


def finetune(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", "finetune", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, stdin=subprocess.DEVNULL)


def learner_env(sidecar_env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    models = tmp_path / "models"
    build_learner(models)
    return {**sidecar_env, "LOCALMLX_MODELS_DIR": str(models)}, models


def test_finetune_json_names_the_adapter_and_models_list_shows_it(sidecar_env, tmp_path: Path) -> None:
    env, models = learner_env(sidecar_env, tmp_path)
    data = write_fact_dataset(tmp_path / "vault notes")  # outside the roots: naming it on the command line grants it
    done = finetune(env, str(data), "--model", LEARNER, "--name", "fact", "--iterations", "10",
                    "--learning-rate", "1e-3", "--rank", "4", "--layers", "-1", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --json: no progress
    result = json.loads(done.stdout)
    assert (result["adapter"], result["model"], result["base"]) == ("fact", f"{LEARNER}+fact", LEARNER)
    assert result["training"]["iterations"] == 10 and result["training"]["rank"] == 4
    assert result["training"]["numLayers"] == -1 and result["training"]["dataset"] == str(data)
    assert (models / "adapters" / "fact" / "adapters.safetensors").is_file()

    listed = localmlx(env, "list")  # a second table: the adapters, with what trained them
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"fact\s+{LEARNER}\s+lora\s+4\s+[\d.]+ KiB\s+10 its on vault notes, val loss [\d.]+", listed.stdout)


def test_finetune_shows_progress_lines_then_the_summary(sidecar_env, tmp_path: Path) -> None:
    env, models = learner_env(sidecar_env, tmp_path)
    data = write_fact_dataset(models / "facts")
    done = finetune(env, str(data), "--model", LEARNER, "--iterations", "6", "--steps-per-eval", "3")
    assert done.returncode == 0, done.stderr
    # Not a terminal: a line per phase and per evaluation instead of a bar.
    assert "reading the dataset…" in done.stderr and "saving the adapter…" in done.stderr
    assert re.search(r"iteration 6/6: loss [\d.]+ · val [\d.]+ · \d+ tok/s · ETA", done.stderr)
    # The adapter is named after the dataset; the summary says how to serve it.
    assert re.search(rf"adapter facts: LoRA rank 8 on \d+ layers of {LEARNER}, 6 iterations in", done.stdout)
    assert f"use it as the model {LEARNER}+facts" in done.stdout


def test_a_dataset_error_names_its_line_and_writes_nothing(sidecar_env, tmp_path: Path) -> None:
    env, models = learner_env(sidecar_env, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\nnot json\n')
    done = finetune(env, str(bad), "--model", LEARNER, "--iterations", "3")
    assert done.returncode == 1 and done.stdout == ""
    assert f"error {INVALID_PARAMS}" in done.stderr and "line 3" in done.stderr and "not JSON" in done.stderr
    assert not (models / "adapters" / "bad").exists()


def test_ctrl_c_cancels_the_run_and_exits_130(sidecar_env, tmp_path: Path) -> None:
    env, models = learner_env(sidecar_env, tmp_path)
    data = write_fact_dataset(tmp_path / "facts")
    child = subprocess.Popen([sys.executable, "-m", "sidecar", "finetune", str(data), "--model", LEARNER,
                              "--iterations", "100000", "--steps-per-eval", "1"], env={**os.environ, **env},
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr is not None
        for line in child.stderr:  # training has started: an evaluation was reported
            if line.startswith("iteration "):
                break
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert "cancelling the run ($/cancelRequest)" in err and "cancelled: no adapter written" in err
    assert not (models / "adapters" / "facts").exists()


def test_fuse_writes_a_model_that_loads_and_rm_adapter_deletes_one(sidecar_env, sidecars, tmp_path: Path) -> None:
    env, models = learner_env(sidecar_env, tmp_path)
    build_random_adapter(models / LEARNER, models / "adapters" / "noise", seed=3)
    fused = localmlx(env, "fuse", f"{LEARNER}+noise", "--name", "fused")
    assert fused.returncode == 0, fused.stderr
    assert "fused into fused" in fused.stdout and (models / "fused" / "config.json").is_file()
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(models))
    assert client.request("models/load", {"model": "fused"})["model"] == "fused"
    reply = client.request("generate", {"model": "fused", "prompt": "The secret", "maxTokens": 3, "temperature": 0})
    assert reply["usage"]["completionTokens"] == 3
    client.close()

    assert localmlx(env, "rm").returncode == 2  # neither a model nor --adapter
    removed = localmlx(env, "rm", "--adapter", "noise")
    assert removed.returncode == 0 and "deleted adapter noise" in removed.stdout, removed.stderr
    assert not (models / "adapters" / "noise").exists()
