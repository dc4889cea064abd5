"""Where models live: the embedded demo, the models dir, the Hugging Face cache.

Turns a model reference from a request into a checked local location, and refuses paths
outside the allowed roots. Nothing here touches MLX.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .demo_model import DEMO_MODEL_ALIAS, DEMO_MODEL_DIRNAME, ensure_demo_model
from .downloads import MODEL_FILE_PATTERNS, converted_dir, is_complete_snapshot, pull
from .errors import Forbidden, InvalidParams, ModelNotFound
from .settings import Settings
from .tuning.adapters import ADAPTER_NAME, named_adapter, read_adapter, split_variant, variant_name

log = logging.getLogger("localmlx.hub")

# huggingface_hub's modules are imported where they are used ("on use"): the sidecar imports
# this module at start-up, and answering initialize must not wait for them.

Progress = Callable[[str, float, "float | None", str], None]


def no_progress(*_: Any, **__: Any) -> None:
    """A Progress that reports nowhere (any arguments: downloads and conversion pass message, details)."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_DIR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


@dataclass(frozen=True)
class ModelLocation:
    """A resolved model: `name` is what requests use; `path` is None until downloaded."""

    name: str
    source: str  # "embedded" | "models-dir" | "hf-cache" | "local-path" | "hub"
    path: Path | None
    repo_id: str | None = None
    # <base>+<adapter>: the base model's location is the rest; it shares the base's weights.
    adapter: Path | None = None
    base: str | None = None

    def base_location(self) -> ModelLocation:
        assert self.base is not None
        return ModelLocation(self.base, self.source, self.path, self.repo_id)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no file system path can hold it
        return False
    return True


def hf_cache_dir() -> Path:
    from huggingface_hub import constants  # on use: this module is imported at start-up, see above

    return Path(constants.HF_HUB_CACHE)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size  # follows HF cache symlinks
    return total


class ModelLocator:
    def __init__(self, settings: Settings) -> None:
        self.models_dir = settings.models_dir
        self.auto_download = settings.auto_download
        self._extra_roots = settings.allowed_roots
        self.allowed_orgs = settings.allowed_orgs
        self.quantization = settings.quantization
        self._settings = settings  # for downloads

    @functools.cached_property
    def allowed_roots(self) -> tuple[Path, ...]:
        """Asked on first use: importing huggingface_hub takes a while, and start-up must not."""
        return (self.models_dir, hf_cache_dir(), *self._extra_roots)

    def demo_path(self) -> Path:
        return self.models_dir / DEMO_MODEL_DIRNAME

    def resolve(self, ref: str) -> ModelLocation:
        if ref == DEMO_MODEL_ALIAS:
            return ModelLocation(DEMO_MODEL_ALIAS, "embedded", self.demo_path())
        if "\x00" in ref or not ref.isprintable() or not _encodable(ref):
            raise Forbidden("Not a valid model reference: it contains control characters, a NUL "
                            "byte or a lone surrogate", model=ref[:200])
        variant = split_variant(ref)
        if variant is not None and not ref.startswith(("/", "~", ".")):  # no model name holds a "+"; a path may
            return self.variant(self.resolve(variant[0]), variant[1])
        if ref.startswith(("/", "~", ".")) or (os.sep in ref and not _REPO_ID.match(ref)):
            return self._local_path(ref)
        if _DIR_NAME.match(ref) and ".." not in ref:
            path = self.models_dir / ref
            if _is_model_dir(path):
                return ModelLocation(ref, "models-dir", path)
            raise ModelNotFound(f"Model not found: no '{ref}' in {self.models_dir}",
                                model=ref, modelsDir=str(self.models_dir))
        if _REPO_ID.match(ref) and ".." not in ref:
            return self._repo(ref)
        raise Forbidden(f"Not a valid model reference: {ref!r}", model=ref)

    def variant(self, base: ModelLocation, adapter_ref: str) -> ModelLocation:
        """`base` served with an adapter: one stored under adapters/, or a directory under the
        allowed roots (then named by its folder's name)."""
        if base.adapter is not None:
            raise InvalidParams(f"{base.name} already has an adapter: name its base model",
                                errors=[{"path": "/adapter", "message": "the model is already an adapter variant"}])
        if ADAPTER_NAME.match(adapter_ref):
            adapter = named_adapter(self.models_dir, adapter_ref)
        else:
            path = self.inside_roots(adapter_ref, field="adapter")
            adapter = read_adapter(path, path.name)
        return ModelLocation(variant_name(base.name, adapter.name), base.source, base.path, base.repo_id,
                             adapter=adapter.path, base=base.name)

    def check_download_allowed(self, repo_id: str) -> None:
        """A repo may be fetched from the Hub only if its id is plain (no path tricks) and its
        owner is in LOCALMLX_ALLOWED_ORGS. Repos already on disk were put there by the user."""
        if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.split("/")[1] in (".", ".."):
            raise InvalidParams(f"Not a Hub repo id: {repo_id[:200]!r} (expected owner/name)",
                                errors=[{"path": "/model", "message": "expected a repo id owner/name"}])
        owner = repo_id.split("/", 1)[0]
        if "*" not in self.allowed_orgs and owner not in self.allowed_orgs:
            raise Forbidden(f"Downloads from {owner!r} are not allowed (LOCALMLX_ALLOWED_ORGS: "
                            f"{', '.join(self.allowed_orgs) or 'none'})", model=repo_id,
                            allowedOrgs=list(self.allowed_orgs))

    def inside_roots(self, ref: str, field: str = "model") -> Path:
        """`ref` as a resolved path, which must lie under one of the allowed roots."""
        roots = [r.expanduser().resolve() for r in self.allowed_roots]
        try:  # ".." is refused outright: where it leads can depend on what exists outside the roots
            path = None if ".." in Path(ref).parts else Path(ref).expanduser().resolve()
        except (RuntimeError, OSError):  # "~someone/x" where no user someone exists, a symlink loop
            path = None
        if path is None or not any(path == root or path.is_relative_to(root) for root in roots):
            # One answer for every path refused, whether or not it exists, so that none tells
            # which accounts, files or folders there are outside the roots.
            refused = Forbidden("Path is outside the allowed model roots", allowedRoots=[str(r) for r in roots])
            refused.data = {field: ref[:200], **refused.data}
            raise refused
        return path

    def _local_path(self, ref: str) -> ModelLocation:
        path = self.inside_roots(ref)
        if not _is_model_dir(path):
            raise ModelNotFound(f"Model not found: {path} is not a model directory (no config.json)",
                                model=ref, path=str(path))
        return ModelLocation(str(path), "local-path", path)

    def _repo(self, repo_id: str) -> ModelLocation:
        local = self.models_dir / repo_id
        if _is_model_dir(local):
            return ModelLocation(repo_id, "models-dir", local)
        converted = converted_dir(self.models_dir, repo_id, self.quantization)
        if converted is not None and _is_model_dir(converted):  # downloaded, then converted
            return ModelLocation(repo_id, "models-dir", converted)
        cached = self._hf_snapshot(repo_id)
        if cached is not None:
            return ModelLocation(repo_id, "hf-cache", cached, repo_id)
        if self.auto_download:
            self.check_download_allowed(repo_id)
            return ModelLocation(repo_id, "hub", None, repo_id)
        raise ModelNotFound(
            f"Model not found locally: {repo_id}. Download it first "
            f"(hf download {repo_id}) or set LOCALMLX_AUTO_DOWNLOAD=true.",
            model=repo_id)

    @staticmethod
    def _hf_snapshot(repo_id: str) -> Path | None:
        from huggingface_hub import snapshot_download  # on use

        try:
            path = Path(snapshot_download(repo_id, local_files_only=True,
                                          allow_patterns=MODEL_FILE_PATTERNS))
        except Exception:  # not cached (or an incomplete snapshot)
            return None
        return path if is_complete_snapshot(path) else None

    def materialize(self, location: ModelLocation, progress: Progress) -> Path:
        """The model's files on disk: built, downloaded or checked. File work only, run off
        the engine thread, so a slow disk or network never delays generation."""
        if location.source == "embedded":
            progress("build", 0, 3, "step")
            return ensure_demo_model(self.models_dir)
        if location.path is None:  # a Hub repo, auto-download on: as models/download does it
            assert location.repo_id is not None  # see _repo
            return pull(location.repo_id, None, self._settings, progress).path
        progress("resolve", 0, 3, "step")
        with open(location.path / "config.json", "rb") as f:
            json.load(f)  # fail early and clearly on a broken config
        return location.path

    def list_local(self) -> list[tuple[ModelLocation, int]]:
        found: list[tuple[ModelLocation, int]] = []
        demo = self.demo_path()
        found.append((ModelLocation(DEMO_MODEL_ALIAS, "embedded", demo),
                      _dir_bytes(demo) if demo.is_dir() else 0))
        if self.models_dir.is_dir():
            for path in sorted(self.models_dir.iterdir()):
                if not path.is_dir() or path.name == DEMO_MODEL_DIRNAME or path.name.startswith("."):
                    continue
                children = [path] if _is_model_dir(path) else sorted(p for p in path.iterdir() if p.is_dir())
                for model_dir in children:
                    if _is_model_dir(model_dir):
                        name = model_dir.relative_to(self.models_dir).as_posix()
                        found.append((ModelLocation(name, "models-dir", model_dir), _dir_bytes(model_dir)))
        found.extend(self._list_hf_cache())
        return found

    def _list_hf_cache(self) -> list[tuple[ModelLocation, int]]:
        from huggingface_hub import scan_cache_dir  # on use

        try:
            info = scan_cache_dir(hf_cache_dir())
        except Exception:  # no cache yet, or unreadable: nothing to list
            return []
        found = []
        for repo in sorted(info.repos, key=lambda r: r.repo_id):
            if repo.repo_type != "model":
                continue
            for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
                if is_complete_snapshot(revision.snapshot_path):
                    found.append((ModelLocation(repo.repo_id, "hf-cache", revision.snapshot_path,
                                                repo.repo_id), repo.size_on_disk))
                    break
        return found


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path`, each counted once (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                info = (Path(root) / name).lstat()
            except OSError:
                continue
            if not stat.S_ISLNK(info.st_mode):
                total += info.st_size
    return total


def delete_model_files(locator: ModelLocator, location: ModelLocation) -> int | None:
    """Delete a model's files: its folder in the models dir, or its whole repo (blobs and
    all) in the Hugging Face cache. Returns the bytes freed, None when nothing was there.
    Refuses anything outside those two places. The folder is first renamed to a hidden
    name, so a crash half-way never leaves a half model that looks complete."""
    if location.path is None or not location.path.exists():
        return None
    path = location.path.resolve()
    models_dir = locator.models_dir.expanduser().resolve()
    cache = hf_cache_dir().expanduser().resolve()
    if path.is_relative_to(cache) and path != cache:
        repo = cache / path.relative_to(cache).parts[0]  # models--owner--name
        target = repo if repo.name.startswith("models--") else path
    elif path.is_relative_to(models_dir) and path != models_dir:
        target = path
    else:
        raise Forbidden(f"Only models in the models dir or the Hugging Face cache can be deleted: {path}",
                        model=location.name)
    freed = tree_bytes(target)
    aside = target.with_name(f".{target.name}.deleting-{uuid.uuid4().hex[:8]}")
    os.rename(target, aside)
    shutil.rmtree(aside, ignore_errors=True)
    parent = target.parent
    if parent != models_dir and parent.is_relative_to(models_dir) and not any(parent.iterdir()):
        parent.rmdir()  # an owner folder left empty (models dir layout owner/name)
    log.info("deleted %s (%d bytes)", target, freed)
    return freed
