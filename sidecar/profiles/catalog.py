"""The profiles a request may name, looked up on the event loop.

Every request's model name may be a profile's, so the lookup must cost next to nothing when it
is not: the names are cached by their directories' modification times (a stat of each), and a
profile by its file's (and its template file's), so an edit takes effect on the next request.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import InvalidParams
from ..settings import Settings
from .store import Profile, ProfileStore, is_profile_name

log = logging.getLogger("localmlx.profiles")

PROFILES_DIRNAME = "profiles"


def profile_directories(settings: Settings) -> list[Path]:
    """LOCALMLX_PROFILES_DIR first (written to when set), then the models dir's profiles/."""
    own = settings.models_dir / PROFILES_DIRNAME
    return [settings.profiles_dir, own] if settings.profiles_dir is not None else [own]


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


class ProfileCatalog:
    def __init__(self, settings: Settings) -> None:
        directories = profile_directories(settings)
        self.store = ProfileStore(directories, write_dir=directories[0])
        self._listed: tuple[tuple[int, ...], frozenset[str]] = ((), frozenset())
        self._profiles: dict[str, tuple[tuple[int, int], Profile]] = {}

    def names(self) -> frozenset[str]:
        stamps = tuple(_mtime(d) for d in self.store.directories)
        if stamps != self._listed[0]:
            self._listed = (stamps, frozenset(self.store.names()))
        return self._listed[1]

    def lookup(self, name: str | None) -> Profile | None:
        """The profile of this name; None when there is none; InvalidParams (naming the file
        and the line) when its file is malformed."""
        if name is None or not is_profile_name(name) or name not in self.names():
            self._profiles.pop(name or "", None)
            return None
        cached = self._profiles.get(name)
        if cached is not None and cached[0] == self._stamps(cached[1]):
            return cached[1]
        profile = self.store.get(name)
        if profile is None:
            return None
        self._profiles[name] = (self._stamps(profile), profile)
        return profile

    @staticmethod
    def _stamps(profile: Profile) -> tuple[int, int]:
        source = profile.template_source
        return _mtime(profile.path), _mtime(Path(source)) if source not in (None, "inline") else 0

    def profiles(self) -> list[Profile]:
        """Every profile that reads (through the cache); a malformed file is logged and left out."""
        found = []
        for name in sorted(self.names()):
            try:
                profile = self.lookup(name)
            except InvalidParams as exc:
                log.warning("profile %s skipped: %s", name, exc.message)
                continue
            if profile is not None:
                found.append(profile)
        return found

    def forget(self) -> None:
        self._listed = ((), frozenset())
        self._profiles.clear()
