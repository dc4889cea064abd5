"""Typed protocol errors: every failure the wire can see has a code, a message and a data object."""

from __future__ import annotations

from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
NOT_INITIALIZED = -32002
REQUEST_CANCELLED = -32800
SERVER_CANCELLED = -32802
MODEL_NOT_FOUND = -32010
MODEL_NOT_LOADED = -32011
MODEL_LOADING = -32012
MODEL_LOAD_FAILED = -32013
OUT_OF_MEMORY = -32014
BUSY = -32015
CONTEXT_LENGTH_EXCEEDED = -32016
MESSAGE_TOO_LARGE = -32017
FORBIDDEN = -32018


def brief(exc: BaseException, limit: int = 200) -> str:
    """An exception as an error message may show it: its first line, cut short."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "…"


class RpcError(Exception):
    """An error answered on the wire. Subclasses fix the code; `data` is always an object."""

    code = INTERNAL_ERROR

    def __init__(self, message: str, code: int | None = None, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "data": self.data}


class ParseError(RpcError):
    code = PARSE_ERROR


class InvalidRequest(RpcError):
    code = INVALID_REQUEST


class MethodNotFound(RpcError):
    code = METHOD_NOT_FOUND


class InvalidParams(RpcError):
    code = INVALID_PARAMS


class InternalError(RpcError):
    code = INTERNAL_ERROR


class NotInitialized(RpcError):
    code = NOT_INITIALIZED


class RequestCancelled(RpcError):
    code = REQUEST_CANCELLED


class ServerCancelled(RpcError):
    code = SERVER_CANCELLED


class ModelNotFound(RpcError):
    code = MODEL_NOT_FOUND


class ModelNotLoaded(RpcError):
    code = MODEL_NOT_LOADED


class ModelLoading(RpcError):
    code = MODEL_LOADING


class ModelLoadFailed(RpcError):
    code = MODEL_LOAD_FAILED


class OutOfMemory(RpcError):
    code = OUT_OF_MEMORY


class Busy(RpcError):
    code = BUSY


class ContextLengthExceeded(RpcError):
    code = CONTEXT_LENGTH_EXCEEDED


class MessageTooLarge(RpcError):
    code = MESSAGE_TOO_LARGE


class Forbidden(RpcError):
    code = FORBIDDEN
