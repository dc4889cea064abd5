"""A session's lifecycle (initialize, serve, shutdown, exit) and the requests each stage refuses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest, NotInitialized, RpcError


@dataclass
class Lifecycle:
    initialized: bool = False
    shutting_down: bool = False
    shutdown_requested: bool = False
    client_info: dict[str, Any] = field(default_factory=dict)
    lost: RpcError | None = None  # a rank of the group is gone: every request is refused with it

    def refusal(self, method: str) -> RpcError | None:
        """Why `method` may not run now, or None."""
        if self.lost is not None:
            return self.lost
        if method == "initialize" and self.initialized:
            return InvalidRequest("Invalid Request: already initialized")
        if not self.initialized and method not in ("initialize", "ping"):
            return NotInitialized("Server not initialized: send initialize first", method=method)
        if self.shutting_down and method not in ("ping", "shutdown"):
            return InvalidRequest("Invalid Request: the server is shutting down", method=method)
        return None
