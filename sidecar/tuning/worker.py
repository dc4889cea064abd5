"""`python -m sidecar.tuning.worker`: the tuning worker process (see workers.py for the
sidecar's side). Its spec names its task: train (train_worker) or fuse (fuse_worker)."""

from __future__ import annotations

import importlib

from ..errors import RpcError
from .worker_io import WorkerIO

TASKS = {"train": ("train_worker", "train"), "fuse": ("fuse_worker", "fuse")}


def main() -> int:
    io = WorkerIO()  # first: from here on, stray prints go to stderr
    from ..blas import use_best_blas

    use_best_blas(io.spec["blas"])  # before MLX is imported: its CPU kernels bind to it then
    module_name, function = TASKS[io.spec["task"]]
    module = importlib.import_module(f".{module_name}", __package__)
    code, failed = module.FAILED
    try:
        getattr(module, function)(io, io.spec)
    except RpcError as exc:  # the request was wrong (a dataset error): said before any work
        io.fail(exc.code, exc.message, **exc.data)
        return 3
    except Exception as exc:
        io.fail(code, f"{failed}: {type(exc).__name__}: {exc}"[:1000], reason=type(exc).__name__)
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
