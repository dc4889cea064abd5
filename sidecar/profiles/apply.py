"""A request through a profile: the profile's settings under the request's own.

Precedence, lowest first: the server's settings, the model's (models/load), the profile's,
the request's. A profile's defaults fill the generation params the request leaves out; its
system prompt opens a chat that has none; its template and context length shape the prompt;
its keep-alive and draft model are the request's unless it names its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .store import Profile


@dataclass(frozen=True)
class ProfileSetup:
    """What a profile adds to a request beyond its params (None: no profile)."""

    profile: Profile | None = None
    routed_by: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # chat_template, context_length for the request

    @property
    def adapter(self) -> str | None:
        return self.profile.adapter if self.profile is not None else None


NO_PROFILE = ProfileSetup()


def with_model_options(profile: Profile, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the profile's keep-alive and draft model where they name none of their own
    (what a profile sets of its model: models/load takes these too)."""
    own = {"keepAlive": profile.keep_alive, "draftModel": profile.draft_model}
    return {**{key: value for key, value in own.items() if value is not None}, **params}


def apply_profile(profile: Profile, params: dict[str, Any], routed_by: dict[str, Any] | None = None
                  ) -> tuple[dict[str, Any], ProfileSetup]:
    merged = {**profile.defaults, **with_model_options(profile, params), "model": profile.model}
    messages = params.get("messages")
    if profile.system is not None and isinstance(messages, list) and not any(
            isinstance(m, dict) and m.get("role") == "system" for m in messages):
        merged["messages"] = [{"role": "system", "content": profile.system}, *messages]
    extras = {"chat_template": profile.template, "context_length": profile.context_length}
    return merged, ProfileSetup(profile, routed_by, extras)
