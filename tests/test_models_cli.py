"""`localmlx models …` and the REPL's /rm: the model cache from a shell, through a sidecar."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sidecar.demo_model import DEMO_MODEL_DIRNAME
from sidecar.protocol_defs import MODEL_NOT_FOUND


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
