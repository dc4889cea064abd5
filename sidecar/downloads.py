"""Hub models onto this disk: downloaded into huggingface-hub's own cache, resumable, verified,
cancellable and never half-visible; converted with mlx-lm when LOCALMLX_QUANTIZATION asks.

Why not `snapshot_download`: huggingface-hub 2.x writes each file to a temporary file unique to
the process and deletes it when the transfer fails, so a cancelled or crashed download starts
over; it checks sizes, not checksums; and it links each file into the snapshot as it arrives, so
a killed download leaves a snapshot with a config.json and no weights. Here, in the same layout
(blobs/, snapshots/<commit>/, refs/<revision>) and through huggingface-hub's own client (so
HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and HF_HOME/HF_HUB_CACHE hold):

- each file goes to blobs/<etag>.incomplete, and a later download resumes it with a Range request;
- it becomes blobs/<etag> only once it matches the Hub's checksum (the sha256 of an LFS file, the
  git blob id of any other);
- the snapshot's links are made when every file is there, config.json last: without config.json a
  directory is not a model (hub.py), so nothing half-written is ever listed or loaded;
- refs/<revision> moves last.

File work only: no MLX here (conversion runs in a child process, see conversion.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cancelled import Cancelled
from .conversion import convert
from .errors import Forbidden, InvalidParams, ModelLoadFailed, ModelNotFound, RpcError, brief
from .settings import Settings

log = logging.getLogger("localmlx.downloads")

# huggingface_hub's client, filelock and httpx2 (about 250 ms together) are imported in the
# functions that use them ("on use" below): the sidecar imports this module at start-up, and
# most sessions never download.

# mlx_lm.utils.DEFAULT_ALLOW_PATTERNS: the files mlx-lm loads. Copied so that a download needs
# no MLX; tests/test_downloads.py checks they agree.
MODEL_FILE_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken",
                       "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]
READ_BYTES = 256 << 10  # per read from the network: also how soon a cancel is seen
RETRIES = 3  # transient network errors, each resumed where the transfer stopped
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

Progress = Callable[..., None]  # (phase, completed, total, unit, message=None, **details)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hub repo, as its tree listing describes it."""

    path: str
    size: int
    blob_id: str  # the git blob id
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        """The blob's name in the cache, as huggingface-hub names it."""
        return self.sha256 or self.blob_id

    def new_checksum(self) -> Any:
        if self.sha256 is not None:
            return hashlib.sha256()
        digest = hashlib.sha1(usedforsecurity=False)  # git's blob id: sha1 of a header and the bytes
        digest.update(b"blob %d\0" % self.size)
        return digest


@dataclass(frozen=True)
class Pulled:
    """A model on disk, as `models/download` answers."""

    model: str
    path: Path
    revision: str | None
    bytes: int
    downloaded_bytes: int
    files: int
    converted: bool

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "path": str(self.path), "revision": self.revision, "bytes": self.bytes,
                "downloadedBytes": self.downloaded_bytes, "files": self.files, "converted": self.converted,
                "quantization": quantization_of(self.path)}


# ---- the whole job: download, then convert when asked ------------------------------------------


def pull(repo_id: str, revision: str | None, settings: Settings, progress: Progress,
         cancel: threading.Event | None = None) -> Pulled:
    """The Hub repo on disk and ready to load: found or downloaded into the Hugging Face cache,
    then, when LOCALMLX_QUANTIZATION asks for a width it is not at, converted into the models
    dir (once: a conversion already there is the answer). The caller has checked that the repo
    may be downloaded."""
    cancel = cancel or threading.Event()
    converted = converted_dir(settings.models_dir, repo_id, settings.quantization)
    if converted is not None and (converted / "config.json").is_file():
        return _describe(repo_id, converted, _source_commit(converted), 0, True)
    snapshot = download(repo_id, revision, progress, cancel)
    if converted is None:
        return snapshot
    bits = int(settings.quantization.removesuffix("bit"))
    if quantization_bits(snapshot.path) == bits:
        return snapshot
    try:
        convert(snapshot.path, converted, bits, progress, cancel, settings,
                provenance={"model": repo_id, "revision": snapshot.revision})
    except (Cancelled, RpcError):
        raise
    except Exception as exc:
        raise _failure(exc, repo_id) from exc
    if not settings.keep_originals and snapshot.revision is not None:
        _remove_revision(snapshot.revision)
    return _describe(repo_id, converted, snapshot.revision, snapshot.downloaded_bytes, True)


def is_complete_snapshot(path: Path) -> bool:
    """A Hugging Face cache snapshot that holds a whole model. Ours are linked config.json
    last; `hf download` links files as they arrive, so an interrupted one may have a
    config.json and not all the weights: the weights mlx-lm loads are checked too."""
    if not (path / "config.json").is_file():
        return False
    try:
        index = json.loads((path / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return any(path.glob("model*.safetensors"))
    shards = set(index.get("weight_map", {}).values()) if isinstance(index, dict) else set()
    return bool(shards) and all((path / shard).is_file() for shard in shards)


def converted_dir(models_dir: Path, repo_id: str, quantization: str) -> Path | None:
    """Where a conversion of `repo_id` at LOCALMLX_QUANTIZATION goes: <owner>/<name>-4bit."""
    if quantization == "none":
        return None
    return models_dir / f"{repo_id}-{quantization}"


def quantization_bits(path: Path) -> int | None:
    quantization = quantization_of(path)
    return None if quantization is None else quantization["bits"]


def quantization_of(path: Path) -> dict[str, Any] | None:
    """An MLX model's quantization, from its config.json; None when it has none."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    found = config.get("quantization") if isinstance(config, dict) else None
    if not isinstance(found, dict) or not isinstance(found.get("bits"), int):
        return None
    described: dict[str, Any] = {"bits": found["bits"]}
    if isinstance(found.get("group_size"), int):
        described["groupSize"] = found["group_size"]
    if isinstance(found.get("mode"), str):
        described["mode"] = found["mode"]
    return described


# ---- downloading ----------------------------------------------------------------------------------


def download(repo_id: str, revision: str | None, progress: Progress, cancel: threading.Event) -> Pulled:
    """Every file mlx-lm needs from `repo_id` at `revision`, in the Hugging Face cache."""
    from huggingface_hub import constants  # on use

    revision = check_revision(revision or "main")
    storage = repo_storage(repo_id)
    if constants.is_offline_mode():
        return _cached(repo_id, revision, storage) or _raise(ModelNotFound(
            f"Model not found locally: {repo_id} (HF_HUB_OFFLINE is set, so it cannot be downloaded)",
            model=repo_id, reason="offline"))
    try:
        commit, files = _remote_files(repo_id, revision)
    except Exception as exc:
        cached = _cached(repo_id, revision, storage) if _is_network_error(exc) else None
        if cached is None:
            raise _failure(exc, repo_id) from exc
        log.warning("the Hub cannot be reached (%s): using the cached %s", brief(exc), repo_id)
        return cached
    meter = Meter(progress, sum(f.size for f in files), sum(_bytes_present(storage, f) for f in files))
    _check_free_space(storage, meter.total - meter.done, repo_id)
    transferred, current = 0, None
    try:
        for file in files:
            current = file.path
            transferred += fetch(repo_id, commit, storage, file, meter, cancel)
        current = None
        snapshot = link_snapshot(storage, commit, files)
        if revision != commit:
            _write_atomically(storage / "refs" / revision, commit)
    except Cancelled:
        log.info("download of %s cancelled at %d of %d bytes: what arrived is kept for a resume", repo_id,
                 meter.done, meter.total)
        raise
    except RpcError:
        raise
    except Exception as exc:
        raise _failure(exc, repo_id, current) from exc
    log.info("downloaded %s at %s: %d files, %d bytes transferred", repo_id, commit, len(files), transferred)
    return _describe(repo_id, snapshot, commit, transferred, False)


def check_revision(revision: str) -> str:
    """A branch, tag or commit: it names a file under refs/, so no path tricks."""
    if not _REVISION.match(revision) or any(part in ("", ".", "..") for part in revision.split("/")):
        raise InvalidParams(f"Not a revision: {revision[:200]!r}",
                            errors=[{"path": "/revision", "message": "expected a branch, tag or commit"}])
    return revision


def repo_storage(repo_id: str) -> Path:
    from huggingface_hub import constants  # on use
    from huggingface_hub.file_download import repo_folder_name  # on use

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _remote_files(repo_id: str, revision: str) -> tuple[str, list[RemoteFile]]:
    """The commit `revision` names now, and the files mlx-lm needs from it, with their sizes and
    checksums."""
    from huggingface_hub import HfApi  # on use
    from huggingface_hub.hf_api import RepoFile  # on use
    from huggingface_hub.utils import filter_repo_objects  # on use

    api = HfApi()
    commit = api.model_info(repo_id, revision=revision).sha
    if commit is None or not _COMMIT.match(commit):
        raise ModelLoadFailed(f"Download failed for {repo_id}: the Hub named no commit for {revision!r}",
                              model=repo_id, reason="no-commit")
    listing = [e for e in api.list_repo_tree(repo_id, revision=commit, recursive=True) if isinstance(e, RepoFile)]
    files = [RemoteFile(e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs is not None else None)
             for e in filter_repo_objects(listing, allow_patterns=MODEL_FILE_PATTERNS, key=lambda e: e.path)]
    for file in files:
        parts = file.path.split("/")
        if file.path.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ModelLoadFailed(f"Download failed for {repo_id}: the Hub listed an unsafe path {file.path[:200]!r}",
                                  model=repo_id, reason="unsafe-path")
    if not any(file.path == "config.json" for file in files):
        raise ModelNotFound(f"Not a model: {repo_id} has no config.json at {revision}", model=repo_id,
                            reason="no-config")
    return commit, files


def _bytes_present(storage: Path, file: RemoteFile) -> int:
    blob = storage / "blobs" / file.etag
    if blob.is_file():
        return file.size
    try:
        return min(file.size, (blob.parent / (blob.name + ".incomplete")).stat().st_size)
    except OSError:
        return 0


def fetch(repo_id: str, commit: str, storage: Path, file: RemoteFile, meter: Meter,
          cancel: threading.Event) -> int:
    """One file into blobs/<etag>: resumed, verified, then renamed. Returns the bytes transferred."""
    blob = storage / "blobs" / file.etag
    if blob.is_file():
        return 0
    from huggingface_hub import hf_hub_url  # on use

    with _blob_lock(storage, file, cancel):
        if blob.is_file():  # another download finished it while we waited
            return 0
        blob.parent.mkdir(parents=True, exist_ok=True)
        partial = Partial(blob.parent / (blob.name + ".incomplete"), file)
        url = hf_hub_url(repo_id, file.path, revision=commit)
        transferred = 0
        try:
            for attempt in range(RETRIES):
                if partial.size == file.size:  # all there (a crash came before the rename): check it
                    break
                had = partial.size
                try:
                    transferred += _transfer(url, partial, meter, cancel)
                    break
                except Exception as exc:  # a stream that broke after some bytes: resumed at once
                    if attempt == RETRIES - 1 or not _is_network_error(exc) or partial.size == had:
                        raise
                    log.warning("transfer of %s broke (%s): resuming at %d", file.path, brief(exc), partial.size)
            partial.finish(repo_id, blob)
        except OSError as exc:
            if exc.errno in _NO_SPACE:  # keeping part of a file that does not fit helps no one
                partial.discard()
            raise
        finally:
            partial.close()
            if partial.size == 0:
                partial.discard()
        return transferred


def _transfer(url: str, partial: Partial, meter: Meter, cancel: threading.Event) -> int:
    from huggingface_hub import constants, get_session  # on use
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status  # on use

    headers = build_hf_headers()
    if partial.size:
        headers["Range"] = f"bytes={partial.size}-"
    transferred = 0
    with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        hf_raise_for_status(response)
        if partial.size and response.status_code != 206:  # the server sent the whole file again
            meter.add(-partial.size, partial.file.path)
            partial.restart()
        for chunk in response.iter_bytes(READ_BYTES):
            if cancel.is_set():
                raise Cancelled(partial.file.path)
            partial.write(chunk)
            transferred += len(chunk)
            meter.add(len(chunk), partial.file.path)
    return transferred


class Partial:
    """blobs/<etag>.incomplete: what has arrived of one file, and its running checksum."""

    def __init__(self, path: Path, file: RemoteFile) -> None:
        self.path, self.file = path, file
        self.out = open(path, "ab")  # noqa: SIM115 (written to across many reads: see close())
        self.checksum, self.size = file.new_checksum(), 0
        with open(path, "rb") as existing:  # a resume: the checksum covers what is already here
            for block in iter(lambda: existing.read(1 << 20), b""):
                self.checksum.update(block)
                self.size += len(block)
        if self.size > file.size:
            self.restart()

    def restart(self) -> None:
        self.out.truncate(0)
        self.checksum, self.size = self.file.new_checksum(), 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.checksum.update(data)
        self.size += len(data)

    def finish(self, repo_id: str, blob: Path) -> None:
        """Renamed into place only when it is whole and matches the Hub's checksum; a file that
        does not is deleted, so the next download fetches it anew."""
        self.out.flush()
        os.fsync(self.out.fileno())  # the rename must not outlive the bytes in a power cut
        expected = self.file.sha256 or self.file.blob_id
        actual = self.checksum.hexdigest()
        if self.size != self.file.size or actual != expected:
            self.discard()
            what = f"{self.size} bytes, expected {self.file.size}" if self.size != self.file.size else \
                f"{'sha256' if self.file.sha256 else 'git blob id'} {actual}, expected {expected}"
            raise ModelLoadFailed(f"Download failed for {repo_id}: {self.file.path} does not match the Hub's "
                                  f"checksum ({what}); it was deleted", model=repo_id, file=self.file.path,
                                  reason="checksum-mismatch", expected=expected, actual=actual)
        os.replace(self.path, blob)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self.out.close()


class _blob_lock:
    """The lock huggingface-hub itself takes on a blob, so two downloads of one file (two
    requests, or `hf download` beside us) never write it at once; waiting can be cancelled."""

    def __init__(self, storage: Path, file: RemoteFile, cancel: threading.Event) -> None:
        from filelock import FileLock  # on use

        path = storage.parent / ".locks" / storage.name / f"{file.etag}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock, self.cancel = FileLock(str(path)), cancel

    def __enter__(self) -> None:
        from filelock import Timeout  # on use

        while True:
            try:
                self.lock.acquire(timeout=0.2)
                return
            except Timeout:
                if self.cancel.is_set():
                    raise Cancelled() from None

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


def link_snapshot(storage: Path, commit: str, files: list[RemoteFile]) -> Path:
    """snapshots/<commit>/ with a link per file, config.json last: until it is there, the
    directory is not a model, so a crash here leaves nothing half-visible."""
    snapshot = storage / "snapshots" / commit
    for file in sorted(files, key=lambda f: f.path == "config.json"):
        link = snapshot / file.path
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(storage / "blobs" / file.etag, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        temporary = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.tmp")
        os.symlink(target, temporary)
        os.replace(temporary, link)
    return snapshot


def _cached(repo_id: str, revision: str, storage: Path) -> Pulled | None:
    """The complete snapshot `revision` names in the cache, if there is one."""
    commit = revision
    if not _COMMIT.match(revision):
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = storage / "snapshots" / commit
    return _describe(repo_id, snapshot, commit, 0, False) if is_complete_snapshot(snapshot) else None


def _describe(name: str, path: Path, revision: str | None, transferred: int, converted: bool) -> Pulled:
    files = [Path(root) / file for root, _, names in os.walk(path) for file in names]
    size = sum(f.stat().st_size for f in files if f.exists())  # follows the cache's links
    return Pulled(name, path, revision, size, transferred, len(files), converted)


def _source_commit(converted: Path) -> str | None:
    try:
        revision = json.loads((converted / "localmlx_source.json").read_text()).get("revision")
    except (OSError, ValueError, AttributeError):
        return None
    return revision if isinstance(revision, str) else None


def _remove_revision(commit: str) -> None:
    """The originals of a conversion: the snapshot, its refs and the blobs no other revision uses
    (huggingface-hub's own cache deletion)."""
    from huggingface_hub import scan_cache_dir  # on use

    try:
        scan_cache_dir().delete_revisions(commit).execute()
    except Exception as exc:  # the conversion stands; a leftover original only takes room
        log.warning("could not remove the original files of %s: %s", commit, brief(exc))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ---- progress ---------------------------------------------------------------------------------


class Meter:
    """Download progress over the whole model: bytes done and in all, the file being fetched,
    the rate over the last few seconds, and the time left at that rate."""

    WINDOW_S = 3.0
    SAMPLE_S = 0.1

    def __init__(self, progress: Progress, total: int, done: int) -> None:
        self.progress, self.total, self.done = progress, total, done
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), done)])
        progress("download", done, total, "bytes")

    def add(self, count: int, file: str) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.samples[-1][0] < self.SAMPLE_S and self.done < self.total:
            return
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.WINDOW_S:
            self.samples.popleft()
        started, done_then = self.samples[0]
        rate = max(0.0, (self.done - done_then) / (now - started)) if now > started else 0.0
        eta = round((self.total - self.done) / rate, 1) if rate > 0 else None
        self.progress("download", self.done, self.total, "bytes", file=file, bytesPerSecond=round(rate),
                      etaSeconds=eta)


# ---- failures ---------------------------------------------------------------------------------

_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _check_free_space(storage: Path, needed: int, repo_id: str) -> None:
    existing = next(p for p in (storage, *storage.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ModelLoadFailed(f"Download failed for {repo_id}: it needs {needed} more bytes and the disk has "
                              f"{free} free", model=repo_id, reason="disk-full", neededBytes=needed, freeBytes=free)


def _is_network_error(exc: BaseException) -> bool:
    import httpx2  # on use

    return isinstance(exc, (httpx2.TransportError, httpx2.StreamError))


def _failure(exc: BaseException, repo_id: str, file: str | None = None) -> RpcError:
    """A download's failure as the wire sees it: what went wrong, in `data.reason`."""
    from huggingface_hub import errors as hub  # on use

    if isinstance(exc, RpcError):
        return exc
    where: dict[str, Any] = {"model": repo_id, **({"file": file} if file else {})}
    if isinstance(exc, hub.GatedRepoError):
        return Forbidden(f"{repo_id} is gated on the Hub: accept its terms there and set HF_TOKEN",
                         reason="gated", **where)
    if isinstance(exc, (hub.RepositoryNotFoundError, hub.RevisionNotFoundError, hub.EntryNotFoundError)):
        return ModelNotFound(f"Model not found on the Hub: {repo_id} (a private repo needs HF_TOKEN)",
                             reason="not-on-hub", **where)
    if isinstance(exc, hub.OfflineModeIsEnabled):
        return ModelNotFound(f"Model not found locally: {repo_id} (HF_HUB_OFFLINE is set)", reason="offline", **where)
    if isinstance(exc, hub.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return ModelLoadFailed(f"Download failed for {repo_id}: the Hub answered HTTP {status}", reason="http",
                               status=status, **where)
    if _is_network_error(exc):
        return ModelLoadFailed(f"Download failed for {repo_id}: {brief(exc)} (run it again to resume)",
                               reason="network", **where)
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return ModelLoadFailed(f"Download failed for {repo_id}: no space left on the disk"
                               f"{f' while writing {file}' if file else ''}", reason="disk-full", **where)
    return ModelLoadFailed(f"Download failed for {repo_id}: {brief(exc)}", reason=type(exc).__name__, **where)


def _raise(error: RpcError) -> Any:
    raise error
