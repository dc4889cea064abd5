"""Converting a downloaded model to MLX at LOCALMLX_QUANTIZATION's width with mlx-lm's own
functions, in a child process.

Conversion is MLX work, and the sidecar's MLX belongs to its one engine thread (MLX is not safe
to drive from two threads at once), so it runs in a process of its own and the engine never
notices. The child writes into a hidden directory of the models dir, which becomes
<models_dir>/<owner>/<name>-<bits>bit by one rename; it reports its steps as JSON lines on
stdout, logs on stderr (the sidecar's), and ends when its stdin closes, that is when the sidecar
is gone. `python -m sidecar.conversion SOURCE DEST BITS` runs the child.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from .blas import use_best_blas
from .cancelled import Cancelled
from .errors import ModelLoadFailed
from .logs import configure_logging
from .settings import Settings, env_from_settings, settings_from_env

log = logging.getLogger("localmlx.conversion")

STEPS = ("load", "quantize", "save")  # reported by the child; then the rename into place
STAGING_DIR = ".localmlx-converting"  # hidden: models/list skips names starting with a dot


def convert(snapshot: Path, dest: Path, bits: int, progress: Callable[..., None], cancel: threading.Event,
            settings: Settings, provenance: dict[str, Any]) -> None:
    """`snapshot` converted and quantized to `bits` at `dest`, all at once or not at all. The
    child gets the sidecar's settings (its BLAS, its log format) whether they came from the
    environment or from flags."""
    staging_root = settings.models_dir / STAGING_DIR
    _remove_abandoned(staging_root)
    staging = staging_root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    total = len(STEPS) + 1
    progress("convert", 0, total, "step", message=f"converting to {bits}-bit MLX")
    child = subprocess.Popen([sys.executable, "-m", "sidecar.conversion", str(snapshot), str(staging), str(bits)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                             env={**os.environ, **env_from_settings(settings)})
    try:
        for line in _lines(child, cancel):
            step = json.loads(line).get("step")
            if step in STEPS:
                progress("convert", STEPS.index(step) + 1, total, "step", message=step)
        if child.wait() != 0 or not (staging / "config.json").is_file():
            raise ModelLoadFailed(f"Conversion failed for {provenance.get('model')}: mlx-lm's converter exited "
                                  f"with status {child.returncode} (its messages are on stderr)",
                                  model=provenance.get("model"), reason="conversion-failed")
        (staging / "localmlx_source.json").write_text(json.dumps(dict(provenance, bits=bits)))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, dest)
        except OSError:
            if not (dest / "config.json").is_file():
                raise
            log.info("%s was converted by another request meanwhile", dest)  # ours is dropped below
        progress("convert", total, total, "step", message="done")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
        shutil.rmtree(staging, ignore_errors=True)


def _lines(child: subprocess.Popen[bytes], cancel: threading.Event) -> Iterator[bytes]:
    """The child's report lines, until it closes stdout; a cancel kills it (see `convert`)."""
    assert child.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        while True:
            if cancel.is_set():
                raise Cancelled("conversion")
            if selector.select(timeout=0.2):
                line = child.stdout.readline()
                if not line:
                    return
                yield line


def _remove_abandoned(staging_root: Path) -> None:
    """Half-written conversions of sidecars that died (the name starts with their pid)."""
    if not staging_root.is_dir():
        return
    for entry in staging_root.iterdir():
        pid = entry.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the child --------------------------------------------------------------------------------


def main(argv: list[str], settings: Settings) -> int:
    source, dest, bits = Path(argv[0]), Path(argv[1]), int(argv[2])
    report = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # mlx-lm prints: only our report lines reach the parent
    threading.Thread(target=_exit_when_the_parent_goes, daemon=True).start()
    use_best_blas(settings.blas)  # before MLX is imported, as the sidecar does
    from mlx_lm.utils import dequantize_model, load, quantize_model, save  # after the BLAS choice

    def done(step: str) -> None:
        report.write(json.dumps({"step": step}) + "\n")

    model, tokenizer, config = cast(tuple[Any, Any, dict[str, Any]], load(str(source), return_config=True, lazy=True))
    done("load")
    if "quantization" in config:  # an MLX model at another width: back to full precision first
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    model, config = quantize_model(model, config, group_size=None, bits=bits)
    done("quantize")
    dest.parent.mkdir(parents=True, exist_ok=True)
    save(dest, source, model, tokenizer, config)
    done("save")
    return 0


def _exit_when_the_parent_goes() -> None:
    sys.stdin.buffer.read()  # returns at end of file: the sidecar closed its end or died
    os._exit(3)


if __name__ == "__main__":
    child_settings = settings_from_env()  # the sidecar's, see `convert`
    configure_logging(child_settings.log_level, child_settings.log_format)
    try:
        code = main(sys.argv[1:], child_settings)
    except BaseException:
        log.exception("conversion failed")
        code = 1
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: the thread watching stdin would hold it up
