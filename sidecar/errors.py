"""Typed protocol errors: every failure the wire can see has a code, a message and a data object.
The codes come from the schema (`$defs/ErrorCode`, generated into `protocol_defs`)."""

from __future__ import annotations

from typing import Any

from .protocol_defs import (  # noqa: F401  (the codes, generated from the schema, are re-exported)
    BUSY,
    CONTEXT_LENGTH_EXCEEDED,
    ERROR_CODES,
    ERROR_MEANINGS,
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MESSAGE_TOO_LARGE,
    METHOD_NOT_FOUND,
    MODEL_LOAD_FAILED,
    MODEL_LOADING,
    MODEL_NOT_FOUND,
    MODEL_NOT_LOADED,
    NOT_INITIALIZED,
    OUT_OF_MEMORY,
    PARSE_ERROR,
    RANK_LOST,
    REQUEST_CANCELLED,
    SERVER_CANCELLED,
    TRAINING_FAILED,
)


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


class RankLost(RpcError):
    code = RANK_LOST


class TrainingFailed(RpcError):
    code = TRAINING_FAILED
