"""model "auto": which profile serves a request, learnt from how each has served on this machine.

The decision, deterministic given its inputs (the request, the profiles, what is loaded, the
measurements, the time):
1. The task: the request's `task`, else classified from it, cheaply: tools or a JSON
   responseFormat -> extraction; a code block or a programming request -> code; a long text to
   condense -> summarize; thinking asked for, or a reasoning request -> reasoning; else chat.
2. The candidates: the profiles declaring that task, else those declaring chat, else all
   (a profile that only embeds never generates). A profile whose model is not loaded and
   does not fit the memory budget is left out.
3. The score, highest wins (ties: the name): measured decode speed (log tokens/s) and time to
   first token, less the shares of failures, cancellations and retries (a request sent again
   soon after with the same conversation), plus a little for being loaded already (no wait)
   and for declaring the task. An unmeasured profile scores as the measured ones' median, so
   it gets tried. Measurements decay (half-life a week)
   and persist in a small JSON file beside the profiles (routing.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..vision.images import image_refs
from .store import Profile

HALF_LIFE_S = 7 * 24 * 3600.0
RETRY_WINDOW_S = 120.0
LONG_TEXT_CHARS = 6000
_CODE = re.compile(r"```|\b(def|class|function|import|return|const|let|fn|public|#include)\b|\bcode\b|\bbug\b|\bcompile",
                   re.IGNORECASE)
_REASONING = re.compile(r"step by step|\bprove\b|\breason\b|\bwhy\b|\bderive\b|\bsolve\b|\bcalculate\b", re.IGNORECASE)
_CONDENSE = re.compile(r"summar|\btl;?dr\b|condense|key points|\bgist\b", re.IGNORECASE)


def _text_of(params: dict[str, Any]) -> str:
    messages = params.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        last = users[-1] if users else ""
        if isinstance(last, list):  # content parts: their text (an image says nothing of the task)
            return "\n".join(p.get("text", "") for p in last if isinstance(p, dict))
        return last if isinstance(last, str) else json.dumps(last)
    return str(params.get("prompt") or "")


def classify(params: dict[str, Any]) -> str:
    """The task of a request that states none (see the module's rule 1)."""
    format_type = (params.get("responseFormat") or {}).get("type", "text")
    if params.get("tools") or format_type != "text":
        return "extraction"
    text = _text_of(params)
    if len(text) >= LONG_TEXT_CHARS or (_CONDENSE.search(text) and len(text) > 400):
        return "summarize"
    if _CODE.search(text):
        return "code"
    if params.get("thinking") is True or _REASONING.search(text):
        return "reasoning"
    return "chat"


@dataclass
class Measures:
    """Decayed sums for one profile: each observation weighs 1/2 per half-life of age."""

    weight: float = 0.0  # decayed count of requests
    tokens_per_second: float = 0.0  # decayed sum
    ttft_s: float = 0.0  # decayed sum
    speed_weight: float = 0.0  # decayed count of requests that produced tokens
    failures: float = 0.0
    cancellations: float = 0.0
    retries: float = 0.0
    at: float = 0.0  # wall time of the last update

    def decayed(self, now: float, half_life: float) -> Measures:
        factor = 0.5 ** (max(0.0, now - self.at) / half_life)
        return Measures(self.weight * factor, self.tokens_per_second * factor, self.ttft_s * factor,
                        self.speed_weight * factor, self.failures * factor, self.cancellations * factor,
                        self.retries * factor, now)

    def score(self) -> float | None:
        if self.weight < 0.5:
            return None  # not measured enough to say
        speed = 0.0
        if self.speed_weight > 0:
            speed = math.log(max(self.tokens_per_second / self.speed_weight, 0.1)) - self.ttft_s / self.speed_weight
        return speed - (3 * self.failures + self.cancellations + 2 * self.retries) / self.weight


@dataclass
class RoutingStats:
    """What each profile's requests measured, decayed, kept in `path` (written whole)."""

    path: Path | None
    half_life: float = HALF_LIFE_S
    measures: dict[str, Measures] = field(default_factory=dict)
    _recent: dict[str, tuple[str, float]] = field(default_factory=dict)  # conversation -> (profile, when)
    _dirty: bool = False

    @classmethod
    def load(cls, path: Path | None, half_life: float = HALF_LIFE_S) -> RoutingStats:
        stats = cls(path, half_life)
        with contextlib.suppress(OSError, ValueError, TypeError):
            if path is not None:
                for name, fields in json.loads(path.read_text()).get("profiles", {}).items():
                    stats.measures[name] = Measures(**{k: float(v) for k, v in fields.items()})
        return stats

    def current(self, name: str, now: float) -> Measures:
        return self.measures.get(name, Measures()).decayed(now, self.half_life)

    def record(self, name: str, now: float, *, ok: bool, cancelled: bool = False,
               tokens_per_second: float | None = None, ttft_s: float | None = None, conversation: str | None = None) -> None:
        m = self.current(name, now)
        m.weight += 1
        if not ok:
            m.failures += 1
        if cancelled:
            m.cancellations += 1
        if tokens_per_second and ttft_s is not None:
            m.tokens_per_second += tokens_per_second
            m.ttft_s += ttft_s
            m.speed_weight += 1
        self.measures[name] = m
        if conversation is not None:
            earlier = self._recent.get(conversation)
            if earlier is not None and now - earlier[1] <= RETRY_WINDOW_S:
                retried = self.current(earlier[0], now)
                retried.retries += 1
                self.measures[earlier[0]] = retried
            self._recent[conversation] = (name, now)
            if len(self._recent) > 1024:
                self._recent.pop(next(iter(self._recent)))
        self._dirty = True

    def save(self) -> None:
        """Written whole (temp file and rename); a failure only loses the latest measurements."""
        if self.path is None or not self._dirty:
            return
        document = {"version": 1, "halfLifeSeconds": self.half_life,
                    "profiles": {n: {k: v for k, v in vars(m).items()} for n, m in sorted(self.measures.items())}}
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(prefix=".routing-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=1)
            os.replace(partial, self.path)
            self._dirty = False


def conversation_key(params: dict[str, Any]) -> str:
    """A request sent again means its answer was not good enough: the same messages (or prompt)."""
    what = params.get("messages") if params.get("messages") is not None else params.get("prompt")
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Candidate:
    profile: Profile
    loaded: bool
    fits: bool
    vision: bool = False  # its model takes images


def choose(params: dict[str, Any], candidates: Iterable[Candidate], stats: RoutingStats,
           now: float | None = None) -> tuple[Profile | None, dict[str, Any]]:
    """The profile for a request and why (RoutedBy without `profile` when none can serve)."""
    now = time.time() if now is None else now
    stated = params.get("task")
    task = stated or classify(params)
    pool = [c for c in candidates if c.profile.tasks != ("embed",)]
    notes: list[dict[str, Any]] = []
    if image_refs(params.get("messages")):  # only a vision model can serve it, whatever its task
        notes = [{"profile": c.profile.name, "score": None, "note": "does not take images"} for c in pool if not c.vision]
        pool = [c for c in pool if c.vision]
    declaring = [c for c in pool if task in c.profile.tasks]
    chosen_from = declaring or [c for c in pool if "chat" in c.profile.tasks] or pool
    notes += [{"profile": c.profile.name, "score": None, "note": "does not declare the task"}
              for c in pool if c not in chosen_from]
    fitting = []
    for c in chosen_from:
        if c.fits or c.loaded:
            fitting.append(c)
        else:
            notes.append({"profile": c.profile.name, "score": None, "note": "does not fit the memory budget"})
    measured = {c.profile.name: stats.current(c.profile.name, now).score() for c in fitting}
    known = [s for s in measured.values() if s is not None]
    prior = statistics.median(known) if known else 0.0
    scored = []
    for c in fitting:
        score = measured[c.profile.name]
        note = "measured" if score is not None else "not measured yet"
        total = (prior if score is None else score) + (0.3 if c.loaded else 0.0) + (0.2 if task in c.profile.tasks else 0.0)
        scored.append((round(total, 6), c.profile.name, c))
        notes.append({"profile": c.profile.name, "score": round(total, 6), "note": note + (", loaded" if c.loaded else "")})
    notes.sort(key=lambda n: n["profile"])
    why: dict[str, Any] = {"task": task, "taskFrom": "stated" if stated else "classified", "candidates": notes}
    if not scored:
        return None, dict(why, reason=f"no profile can serve a {task} request")
    best = min(scored, key=lambda item: (-item[0], item[1]))
    name = best[1]
    reason = (f"{task} ({why['taskFrom']}): {name} scores highest of {len(scored)}"
              + (" (measured on this machine)" if measured[name] is not None else " (not measured yet)"))
    return best[2].profile, dict(why, profile=name, reason=reason)
