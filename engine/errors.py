"""Typed errors of the engine.

Every error says whether the engine survives it (``recoverable``): a bad request fails
alone and the engine keeps serving the others; an :class:`EngineDeadError` means the
engine must be restarted (the replica's health check turns NOT_SERVING).
"""

from __future__ import annotations


class DGServeError(Exception):
    """Base class of every error raised by dgserve."""

    recoverable: bool = True


class InvalidRequestError(DGServeError, ValueError):
    """The request is malformed (empty prompt, bad parameter, bad pinned positions).

    Maps to gRPC INVALID_ARGUMENT. The engine and the other requests are unaffected.
    """


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus ``max_new_tokens`` does not fit the context the engine serves.

    Maps to gRPC OUT_OF_RANGE. Never truncated silently.
    """

    def __init__(self, message: str, *, requested: int, limit: int) -> None:
        super().__init__(message)
        self.requested = requested
        self.limit = limit


class ConfigError(DGServeError, ValueError):
    """An engine or application configuration value is out of range or inconsistent."""

    recoverable = False


class ModelLoadError(DGServeError):
    """The model directory is missing, corrupt or does not match its config."""

    recoverable = False


class ContextVerificationError(DGServeError):
    """Start-up check: the engine cannot serve the context length it was asked to serve.

    ``served`` and ``requested`` carry both numbers; ``cause`` names what limits it
    (``max_position_embeddings``, ``rope``, ``kv_memory``).
    """

    recoverable = False

    def __init__(self, message: str, *, requested: int, served: int, cause: str) -> None:
        super().__init__(message)
        self.requested = requested
        self.served = served
        self.cause = cause


class EngineDeadError(DGServeError):
    """The engine loop (or a tensor-parallel worker) died; nothing more can be served."""

    recoverable = False


class RequestCancelledError(DGServeError):
    """The request was aborted by its caller; its slot has been freed."""
