"""ApiKube (the real ``kubernetes`` client calls) against a tiny local HTTP server that answers
like the API server does for the few endpoints the operator uses.

A stand-in server, because no kube-apiserver can run on CI machines: it checks the URLs, verbs,
content types and bodies the client really sends, and how 404s and errors are mapped.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from dgserve.operator.errors import ApiRejectedError, TransientApiError
from dgserve.operator.kube import ApiKube

RS_PATH = "/apis/ray.io/v1/namespaces/ml/rayservices"
DG_PATH = "/apis/dgserve.io/v1alpha1/namespaces/ml/diffusiongemmas"


class FakeApiServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, str | None, object]] = []
        self.objects: dict[str, dict] = {}
        self.ray_served = True
        self.fail_status: int | None = None


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _reply(self, code: int, body: object) -> None:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if not isinstance(body, bytes) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((method, self.path, self.headers.get("Content-Type"), body))
        if self.server.fail_status:
            return self._reply(self.server.fail_status, {"kind": "Status", "code": self.server.fail_status,
                                                         "message": "boom"})
        if self.path == "/apis/ray.io/v1":
            if not self.server.ray_served:
                return self._reply(404, b"404 page not found")
            return self._reply(200, {"kind": "APIResourceList", "groupVersion": "ray.io/v1", "resources": [
                {"name": "rayservices", "singularName": "rayservice", "namespaced": True, "kind": "RayService",
                 "verbs": ["get", "create", "patch"]}]})
        if method == "POST" and self.path == RS_PATH:
            self.server.objects[f"{RS_PATH}/{body['metadata']['name']}"] = body
            return self._reply(201, body)
        key = self.path.removesuffix("/status")
        if method == "GET":
            obj = self.server.objects.get(key)
            return self._reply(200, obj) if obj else self._reply(404, {"kind": "Status", "code": 404,
                                                                       "reason": "NotFound"})
        if method == "PATCH":
            obj = self.server.objects.setdefault(key, {})
            obj.update(body)
            return self._reply(200, obj)
        return self._reply(405, {"kind": "Status", "code": 405})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")


@pytest.fixture
def server():
    srv = FakeApiServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def kube(server):
    config = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    config.retries = 0
    return ApiKube(client.ApiClient(config))


def test_discovery(kube, server):
    assert kube.rayservice_api_available() is True
    server.ray_served = False
    assert kube.rayservice_api_available() is False  # KubeRay's CRD not installed: 404 on the group


def test_get_create_patch_rayservice(kube, server):
    assert kube.get_rayservice("ml", "gemma") is None
    body = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "gemma", "namespace": "ml"},
            "spec": {"serveConfigV2": "applications: []"}}
    assert kube.create_rayservice("ml", body)["metadata"]["name"] == "gemma"
    assert kube.get_rayservice("ml", "gemma")["spec"] == body["spec"]
    kube.patch_rayservice("ml", "gemma", {"spec": {"serveConfigV2": "x"}})
    method, path, ctype, sent = server.requests[-1]
    assert (method, path, ctype) == ("PATCH", f"{RS_PATH}/gemma", "application/merge-patch+json")
    assert sent == {"spec": {"serveConfigV2": "x"}}


def test_status_goes_to_the_status_subresource(kube, server):
    kube.patch_diffusiongemma_status("ml", "gemma", {"observedGeneration": 2})
    method, path, ctype, sent = server.requests[-1]
    assert (method, path, ctype) == ("PATCH", f"{DG_PATH}/gemma/status", "application/merge-patch+json")
    assert sent == {"status": {"observedGeneration": 2}}
    assert kube.get_diffusiongemma("ml", "absent") is None


@pytest.mark.parametrize("code, error", [(503, TransientApiError), (429, TransientApiError),
                                         (409, TransientApiError), (422, ApiRejectedError)])
def test_errors_are_typed(kube, server, code, error):
    server.fail_status = code
    with pytest.raises(error, match="RayService ml/gemma"):
        kube.patch_rayservice("ml", "gemma", {"spec": {}})


def test_connection_refused_is_transient():
    config = client.Configuration(host="http://127.0.0.1:1")
    config.retries = 0
    with pytest.raises(TransientApiError, match="get RayService"):
        ApiKube(client.ApiClient(config)).get_rayservice("ml", "gemma")
