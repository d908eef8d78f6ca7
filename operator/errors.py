"""Typed errors of the operator. Handlers map them onto kopf's retry intents:
:class:`InvalidSpecError` -> ``kopf.PermanentError`` (editing the resource is the only fix),
:class:`TransientApiError` and :class:`KubeRayMissingError` -> ``kopf.TemporaryError``.
"""

from __future__ import annotations

from dgserve.engine.errors import ConfigError, DGServeError


class InvalidSpecError(ConfigError):
    """The DiffusionGemma spec can never be served as written (the message names field and limit)."""


class KubeRayMissingError(DGServeError):
    """KubeRay's RayService API (``rayservices.ray.io/v1``) is not served by this cluster."""


class TransientApiError(DGServeError):
    """A Kubernetes API call failed in a way a retry can fix (5xx, 429, conflict, connection)."""

    def __init__(self, message: str, *, delay: float = 10.0) -> None:
        super().__init__(message)
        self.delay = delay


class ApiRejectedError(DGServeError):
    """The API server refused an object the operator rendered (4xx other than conflict/throttling)."""

    recoverable = False
