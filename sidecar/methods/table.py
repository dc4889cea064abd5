"""The method table. Each family module registers its methods here under their wire names;
jsonrpcserver calls the one a request names, and it answers with jsonrpcserver's `Success` or
`Error`: a typed error as it is, anything else (a bug) as a bare -32603, its traceback on
stderr and never on the wire."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from jsonrpcserver import Error, Result, Success
from jsonrpcserver.methods import Methods

from .. import schema
from ..errors import InternalError, RpcError
from ..inflight import CancelledAnswer, InFlightRequest, cancel_error

log = logging.getLogger("localmlx.session")

OFF_LOOP_VALUES = 4096  # params holding more values are checked off the loop (~10 µs a value)

Method = Callable[[InFlightRequest, dict[str, Any]], Awaitable[Any]]

METHODS: Methods = {}  # wire name -> handler(request) -> Result
WHEN_CANCELLED: dict[str, CancelledAnswer] = {}


def rpc_method(name: str, when_cancelled: CancelledAnswer = cancel_error) -> Callable[[Method], Method]:
    """Register `fn(request, params) -> result` under its wire name; `when_cancelled` is what
    its requests answer when they are cancelled before their work can answer for itself."""
    def register(fn: Method) -> Method:
        async def handler(request: InFlightRequest, /) -> Result:
            try:
                params = await _checked_params(name, request.params)
                request.session.inject_fault(f"method:{name}")
                return Success(await fn(request, params))
            except Exception as exc:  # the one place a method's failure becomes its answer
                error = exc if isinstance(exc, RpcError) else _internal_error(name)
                return Error(error.code, error.message, error.data)

        handler.__name__ = fn.__name__
        METHODS[name] = handler
        WHEN_CANCELLED[name] = when_cancelled
        return fn

    return register


def _internal_error(method: str) -> RpcError:
    log.exception("internal error in %s", method)
    return InternalError("Internal error", method=method)


async def _checked_params(method: str, params: Any) -> dict[str, Any]:
    """Params checked against the schema: many of them (up to 0.7 s of checking) on a worker
    thread, so that the loop goes on serving the others meanwhile."""
    if params is not None and schema.check_size(params) > OFF_LOOP_VALUES:
        return await anyio.to_thread.run_sync(schema.check_params, method, params, abandon_on_cancel=True)
    return schema.check_params(method, params)
