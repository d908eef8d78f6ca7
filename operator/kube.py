"""The few Kubernetes API calls the operator makes, behind a small protocol.

The reconcile steps take a :class:`Kube`; the operator passes :class:`ApiKube` (the official
``kubernetes`` client), the tests pass a recording double. Every API error is mapped here onto
the operator's typed errors: :class:`TransientApiError` where a retry can help (5xx, 429,
conflicts, connection errors, RBAC not granted yet), :class:`ApiRejectedError` where it cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from . import names
from .errors import ApiRejectedError, TransientApiError

T = TypeVar("T")


class Kube(Protocol):
    def rayservice_api_available(self) -> bool:
        """Whether this cluster serves ``rayservices.ray.io/v1`` (KubeRay's CRD is installed)."""

    def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_rayservice(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def patch_rayservice(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch (RFC 7386)."""

    def get_diffusiongemma(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def patch_diffusiongemma_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """JSON merge patch of the status subresource with ``{"status": status}``."""


def map_api_error(what: str, exc: BaseException) -> Exception:
    """The operator's typed error for a failed API call (to raise ``from exc``)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        code = exc.status or 0
        if code == 409:
            return TransientApiError(f"{what}: conflict (409), will retry", delay=1.0)
        if code == 429:
            retry = (exc.headers or {}).get("Retry-After") if hasattr(exc, "headers") else None
            delay = float(retry) if retry and str(retry).isdigit() else 10.0
            return TransientApiError(f"{what}: throttled (429), retry in {delay:g}s", delay=delay)
        if code >= 500 or code == 0:
            return TransientApiError(f"{what}: API server error {code}: {exc.reason}", delay=10.0)
        if code in (401, 403):
            return TransientApiError(f"{what}: forbidden ({code}); check the operator's RBAC: {exc.reason}",
                                     delay=60.0)
        return ApiRejectedError(f"{what}: rejected by the API server ({code}): {exc.body or exc.reason}")
    return TransientApiError(f"{what}: {type(exc).__name__}: {exc}", delay=10.0)


class ApiKube:
    """:class:`Kube` over the official client (kubeconfig or in-cluster service account)."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client

        self._custom = client.CustomObjectsApi(api_client)

    @staticmethod
    def load_config() -> None:
        """In-cluster service account when running in a pod, else the current kubeconfig."""
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()

    def _call(self, what: str, fn: Callable[[], T], *, missing: T | None = None, allow_404: bool = False) -> T:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except ApiException as e:
            if allow_404 and e.status == 404:
                return missing  # type: ignore[return-value]
            raise map_api_error(what, e) from e
        except (OSError, ValueError) as e:  # connection refused/reset, TLS, bad response body
            raise map_api_error(what, e) from e
        except Exception as e:
            if type(e).__module__.startswith("urllib3"):
                raise map_api_error(what, e) from e
            raise

    def rayservice_api_available(self) -> bool:
        res = self._call("discover ray.io/v1", lambda: self._custom.get_api_resources(names.RAY_GROUP,
                                                                                        names.RAY_VERSION),
                         missing=None, allow_404=True)
        if res is None:
            return False
        resources = getattr(res, "resources", None) or (res.get("resources") if isinstance(res, dict) else []) or []
        return any((getattr(r, "name", None) or (r.get("name") if isinstance(r, dict) else None))
                   == names.RAYSERVICE_PLURAL for r in resources)

    def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(f"get RayService {namespace}/{name}", lambda: self._custom.get_namespaced_custom_object(
            names.RAY_GROUP, names.RAY_VERSION, namespace, names.RAYSERVICE_PLURAL, name), allow_404=True)

    def create_rayservice(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        return self._call(f"create RayService {namespace}/{name}", lambda: self._custom.create_namespaced_custom_object(
            names.RAY_GROUP, names.RAY_VERSION, namespace, names.RAYSERVICE_PLURAL, body))

    def patch_rayservice(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._call(f"patch RayService {namespace}/{name}", lambda: self._custom.patch_namespaced_custom_object(
            names.RAY_GROUP, names.RAY_VERSION, namespace, names.RAYSERVICE_PLURAL, name, patch,
            _content_type="application/merge-patch+json"))

    def get_diffusiongemma(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(f"get DiffusionGemma {namespace}/{name}", lambda: self._custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL, name), allow_404=True)

    def patch_diffusiongemma_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._call(f"patch DiffusionGemma {namespace}/{name} status",
                   lambda: self._custom.patch_namespaced_custom_object_status(
                       names.GROUP, names.VERSION, namespace, names.PLURAL, name, {"status": status},
                       _content_type="application/merge-patch+json"))
