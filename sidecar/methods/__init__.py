"""Protocol methods, one module per family. Each is `async def fn(context, params) -> result`,
registered under its wire name; params arrive already checked against the schema."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from jsonrpcserver import Error, Success

from ..errors import INTERNAL_ERROR

Handler = Callable[[Any, dict[str, Any]], Awaitable[Any]]
_registry: dict[str, Handler] = {}


def rpc_method(name: str) -> Callable[[Handler], Handler]:
    """Register `fn` under its wire name. jsonrpcserver calls it; whatever it raises travels
    back untouched as the error's `data` (jsonrpcserver's own catch-all would turn it into an
    error carrying the exception's text), for the session to answer: an RpcError as itself,
    anything else as a bare -32603 with the traceback on stderr."""
    def register(fn: Handler) -> Handler:
        async def dispatched(context: Any, /, **params: Any) -> Any:
            try:
                context.session.inject_fault(f"method:{name}")
                return Success(await fn(context, params))
            except Exception as exc:
                return Error(INTERNAL_ERROR, "raised", exc)

        dispatched.__name__ = fn.__name__
        _registry[name] = dispatched
        return fn

    return register


def register_all(methods: dict[str, Any]) -> None:
    from . import downloads, embed, generate, lifecycle, models  # noqa: F401  (registration by import)

    methods.update(_registry)
