"""Choose the BLAS that MLX's CPU kernels use, before MLX is imported.

The `mlx[cpu]` wheel links a bundled reference BLAS (a few GFLOP/s). MLX calls `cblas_sgemm`
and friends through the dynamic linker, which binds them to the first library in the
process's global scope that exports them. So loading an optimized BLAS (OpenBLAS) with
RTLD_GLOBAL before `import mlx.core` makes MLX use it: no re-exec, no LD_PRELOAD. On macOS
MLX uses Accelerate (and Metal for the GPU); nothing is loaded there.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("localmlx.blas")

# The symbol MLX's matmul binds to; whoever exports it in the global scope is the BLAS in use.
_MATMUL_SYMBOL = "cblas_sgemm"
_KNOWN_NAMES = ("openblas", "mkl", "blis", "atlas")
# Fedora names its pthread build libopenblasp; Debian keeps each variant in its own directory.
_OPENBLAS_FILES = ("libopenblasp.so.0", "libopenblas.so.0")


@dataclass(frozen=True)
class BlasInUse:
    """`name`: "bundled" (the wheel's own), "accelerate" (macOS), or the loaded library's
    kind ("openblas", "mkl", "blis", "atlas", else "external"); `library`: its path."""

    name: str
    library: str | None = None

    def to_json(self) -> dict[str, str]:
        return {"name": self.name} if self.library is None else {"name": self.name, "library": self.library}


_in_use: BlasInUse | None = None


def openblas_candidates() -> list[str]:
    """Where distributions put OpenBLAS, pthread builds first (they scale over cores)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    directories = [
        f"/usr/lib/{multiarch}/openblas-pthread",  # Debian, Ubuntu: libopenblas0-pthread
        f"/usr/lib/{multiarch}",  # Debian's alternatives link (whichever variant is chosen)
        "/usr/lib64",  # Fedora, RHEL, openSUSE
        "/usr/lib",  # Arch, Alpine
        "/usr/local/lib",  # built from source
        os.path.join(sys.base_prefix, "lib"),  # conda
    ]
    return [os.path.join(d, name) for d in directories for name in _OPENBLAS_FILES]


def find_openblas(exists: Callable[[str], bool] = os.path.exists) -> str:
    """The first OpenBLAS on disk, else its soname for the dynamic linker's own search
    (LD_LIBRARY_PATH, ld.so.cache). Not ctypes.util.find_library: on a miss it runs ldconfig
    and then gcc, tens of ms on every start."""
    for path in openblas_candidates():
        if exists(path):
            return path
    return "libopenblas.so.0"


def _kind_of(library: str) -> str:
    basename = os.path.basename(library).lower()
    return next((name for name in _KNOWN_NAMES if name in basename), "external")


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _global_matmul_provider() -> str | None:
    """The file that exports cblas_sgemm in the process's global scope (what MLX will bind
    to), or None when none does (MLX then binds to its bundled BLAS)."""
    process = ctypes.CDLL(None)
    try:
        address = ctypes.cast(getattr(process, _MATMUL_SYMBOL), ctypes.c_void_p)
    except AttributeError:
        return None
    info = _DlInfo()
    if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _observed() -> BlasInUse:
    provider = _global_matmul_provider()
    return BlasInUse("bundled") if provider is None else BlasInUse(_kind_of(provider), provider)


def _load(library: str) -> str | None:
    """Load `library` into the global scope; None when that worked, else why not."""
    try:
        handle = ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return str(exc)
    if not hasattr(handle, _MATMUL_SYMBOL):
        return f"it does not export {_MATMUL_SYMBOL}"
    return None


def use_best_blas(choice: str) -> BlasInUse:
    """Apply the LOCALMLX_BLAS choice ("auto", "bundled" or an absolute path); call once, before
    anything imports MLX. Never fails: without a usable library MLX keeps its bundled BLAS."""
    global _in_use
    if sys.platform != "linux" or choice == "bundled":
        _in_use = _without_loading()
    else:
        library = find_openblas() if choice == "auto" else choice
        failure = _load(library)
        _in_use = _observed()
        if failure is not None and choice == "auto":
            log.info("no optimized BLAS found (%s); MLX uses the wheel's bundled BLAS: on Debian/Ubuntu "
                     "`apt-get install libopenblas0-pthread` makes fp32 on CPU several times faster", failure)
        elif failure is not None:
            log.warning("LOCALMLX_BLAS=%s not used (%s); falling back to %s", choice, failure, _in_use.name)
    log.info("BLAS in use: %s%s", _in_use.name, f" ({_in_use.library})" if _in_use.library else "")
    return _in_use


def _without_loading() -> BlasInUse:
    if sys.platform == "darwin":
        return BlasInUse("accelerate")
    # On Linux, look anyway: the user may have preloaded one (LD_PRELOAD).
    return _observed() if sys.platform == "linux" else BlasInUse("bundled")


def blas_in_use() -> BlasInUse:
    """What `use_best_blas` chose; without it, what the process has."""
    return _in_use if _in_use is not None else _without_loading()
