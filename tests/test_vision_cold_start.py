"""With mlx-vlm installed, serving text never imports it: not on the way to `initialize`, not
when `models/list` tells vision checkpoints apart, not when a text model loads and generates.

Python's own import log (`PYTHONPROFILEIMPORTTIME`, inherited by any child process) names every
module the real sidecar imported, from every thread; mlx_lm must be among them (the log covers
the engine thread), mlx_vlm must not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.client import SidecarClient, sidecar_command
from sidecar.demo_model import DEMO_MODEL_DIRNAME, build_demo_model

pytestmark = pytest.mark.timeout(120)


def imported_modules(log: str) -> set[str]:
    """The names in `import time: self | cumulative | name` lines (indentation shows nesting)."""
    return {line.rsplit("|", 1)[1].strip() for line in log.splitlines()
            if line.startswith("import time:") and line.count("|") == 2 and "imported package" not in line}


def test_the_text_path_never_imports_mlx_vlm(tmp_path: Path) -> None:
    pytest.importorskip("mlx_vlm")
    from .vision_models import NAME, build

    build_demo_model(tmp_path / DEMO_MODEL_DIRNAME)
    build(tmp_path)
    log_path = tmp_path / "imports.log"
    with log_path.open("wb") as log:
        client = SidecarClient(sidecar_command(), stderr=log.fileno(), env={
            "LOCALMLX_MODELS_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPROFILEIMPORTTIME": "1"})
        try:
            client.initialize(name="pytest")
            listed = {m["model"]: m for m in client.request("models/list", {})["models"]}
            assert "vision" in listed[NAME]["capabilities"]
            assert client.request("generate", {"model": "demo", "prompt": "The sea", "maxTokens": 3})["text"]
            assert client.close() == 0
        finally:
            if client.process.poll() is None:
                client.process.kill()
                client.process.wait()
    modules = imported_modules(log_path.read_text(encoding="utf-8", errors="replace"))
    assert "mlx_lm" in modules  # the log holds the engine thread's imports: the check below means something
    assert sorted(m for m in modules if m.split(".")[0] == "mlx_vlm") == []
