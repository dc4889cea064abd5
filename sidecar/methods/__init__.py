"""Protocol methods, one module per family. Each is `async def fn(context, params) -> result`,
registered under its wire name; params arrive already checked against the schema."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from jsonrpcserver import Error, Success

from ..errors import INTERNAL_ERROR, RpcError

log = logging.getLogger("localmlx.methods")

Handler = Callable[[Any, dict[str, Any]], Awaitable[Any]]
_registry: dict[str, Handler] = {}


def rpc_method(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        async def dispatched(context: Any, **params: Any) -> Any:
            try:
                return Success(await fn(context, params))
            except RpcError as error:  # typed errors keep their code and data object
                return Error(error.code, error.message, error.data)
            except Exception as exc:  # a bug: the traceback goes to stderr, never to the wire
                log.exception("internal error in %s", name)
                return Error(INTERNAL_ERROR, f"Internal error: {type(exc).__name__}", {"method": name})

        dispatched.__name__ = fn.__name__
        _registry[name] = dispatched
        return fn

    return register


def register_all(methods: dict[str, Any]) -> None:
    from . import downloads, embed, generate, lifecycle, models  # noqa: F401  (registration by import)

    methods.update(_registry)
