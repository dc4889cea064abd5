"""Protocol methods, one module per family, and the dispatch of a request to its method
through jsonrpcserver (see table)."""

from __future__ import annotations

from typing import Any

from jsonrpcserver.async_dispatcher import dispatch_request
from jsonrpcserver.dispatcher import to_response
from jsonrpcserver.request import Request
from jsonrpcserver.response import to_serializable

from ..inflight import CancelledAnswer, InFlightRequest, cancel_error
from . import downloads, embed, generate, lifecycle, models, profiles, tuning  # noqa: F401  (they register their methods)
from .table import METHODS, WHEN_CANCELLED

__all__ = ["METHODS", "dispatch", "when_cancelled"]


async def dispatch(request: InFlightRequest) -> dict[str, Any]:
    """The response to a request whose method is in the table. Its params are the method's
    to check against the schema, so jsonrpcserver passes the method only the request."""
    response = to_serializable(to_response(*await dispatch_request(METHODS, request, Request(
        request.method, [], request.id))))
    assert isinstance(response, dict)  # one request, one response (jsonrpcserver's type allows a batch)
    outcome = "error" if "error" in response else "result"
    return {"jsonrpc": "2.0", "id": request.id, outcome: response[outcome]}  # the id first, as ever


def when_cancelled(method: str) -> CancelledAnswer:
    """What a request answers when cancelled before its work can answer for itself."""
    return WHEN_CANCELLED.get(method, cancel_error)
