"""Errors of the serving layer and the one mapping from any error to a gRPC status code.

Serve's gRPC proxy turns an unmapped exception into INTERNAL with the whole remote traceback:
every path out of the router goes through :func:`status_for`.
"""

from __future__ import annotations

import asyncio

import grpc

from dgserve.engine.errors import (
    ContextLengthExceededError,
    DGServeError,
    EngineDeadError,
    InvalidRequestError,
    RequestCancelledError,
)


class ServingError(DGServeError):
    """A request error with its gRPC status code (and, for RESOURCE_EXHAUSTED, a retry hint)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # picklable despite keyword-only arguments
        return (_rebuild, (self.code.name, str(self), self.retry_after_s))


def _rebuild(code: str, message: str, retry_after_s: float | None) -> ServingError:
    return ServingError(grpc.StatusCode[code], message, retry_after_s=retry_after_s)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details for an exception (never a traceback)."""
    if isinstance(exc, ServingError):
        return exc.code, str(exc)
    if isinstance(exc, ContextLengthExceededError):
        return grpc.StatusCode.OUT_OF_RANGE, str(exc)
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (RequestCancelledError, asyncio.CancelledError)):
        return grpc.StatusCode.CANCELLED, str(exc) or "request cancelled"
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, f"backend engine died: {exc}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def failure_code_name(exc: BaseException) -> tuple[str, str]:
    code, details = status_for(exc)
    return code.name, details
