"""A recording fake Kubernetes API server on loopback, for running the real operator process (kopf and the
official ``kubernetes`` client) against it.

A double, because no kube-apiserver can run on CI machines (see DESIGN.md): it speaks just enough of the
API over plain HTTP for ``dgserve operator run``: discovery (``/api``, ``/apis``, group versions), list and
watch (newline-delimited events, held open briefly), get, create, JSON merge patch (objects and the
status subresource) and events, for DiffusionGemmas, RayServices, the kopf peerings and CRDs. Every
request is recorded as the RBAC triple it needs ``(apiGroup, resource, verb)``, so a test can compare
what the operator really asks for with its ClusterRoles. Like the real API server's
OwnerReferencesPermissionEnforcement admission plugin, setting ``blockOwnerDeletion`` on an owner
reference counts as ``update`` on the owner's ``finalizers`` subresource.

``crash_point`` makes matching requests wait until released and then drops them unapplied (the connection
closes without an answer), so a test can kill the operator at a chosen moment of a reconcile.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dgserve.operator import names
from operator_testlib import merge_patch

# group -> version -> [(plural, kind, namespaced, subresources)]
RESOURCES: dict[str, dict[str, list[tuple[str, str, bool, tuple[str, ...]]]]] = {
    "": {"v1": [("events", "Event", True, ()), ("namespaces", "Namespace", False, ())]},
    names.GROUP: {names.VERSION: [(names.PLURAL, names.KIND, True, ("status",))]},
    names.RAY_GROUP: {names.RAY_VERSION: [(names.RAYSERVICE_PLURAL, "RayService", True, ("status",))]},
    "kopf.dev": {"v1": [("clusterkopfpeerings", "ClusterKopfPeering", False, ()),
                        ("kopfpeerings", "KopfPeering", True, ())]},
    "apiextensions.k8s.io": {"v1": [("customresourcedefinitions", "CustomResourceDefinition", False, ())]},
}
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
_PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                   r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")


class FakeApiServer:
    """Objects keyed by ``(group, plural, namespace, name)``; ``requests`` lists every call as
    ``(method, path, (group, resource, verb) or None for discovery, namespace or "")``."""

    def __init__(self, authorize: Callable[[tuple[str, str, str, str]], bool] | None = None) -> None:
        self.authorize = authorize  # (group, resource, verb, namespace) -> allowed; else 403, like RBAC
        self.denied: list[tuple[str, str, str, str]] = []
        self.lock = threading.Condition()
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.log: list[tuple[int, str, tuple[str, str, str, str], dict[str, Any]]] = []  # rv, type, key, obj
        self.rv = 1
        self.requests: list[tuple[str, str, tuple[str, str, str] | None, str]] = []
        self.creates: list[tuple[str, str, str, str]] = []  # successful creates (duplicates would show)
        self.holds: list[tuple[Callable[[str, str], bool], threading.Event]] = []
        self.held = threading.Event()  # set when a request is being held
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # --- life cycle ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, release in self.holds:
            release.set()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "operator", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "operator"}}]}))
        return path

    # --- objects ---------------------------------------------------------------------------------------

    def put(self, group: str, plural: str, namespace: str, body: dict[str, Any], event: str = "ADDED") -> dict:
        with self.lock:
            return self._store(group, plural, namespace, copy.deepcopy(body), event)

    def _store(self, group: str, plural: str, ns: str, obj: dict[str, Any], event: str) -> dict[str, Any]:
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        if ns:
            meta["namespace"] = ns
        meta["resourceVersion"] = str(self.rv)
        key = (group, plural, ns, meta["name"])
        self.objects[key] = obj
        self.log.append((self.rv, event, key, copy.deepcopy(obj)))
        self.lock.notify_all()
        return copy.deepcopy(obj)

    def get(self, group: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get((group, plural, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def of(self, group: str, plural: str) -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(o) for (g, p, _, _), o in self.objects.items() if (g, p) == (group, plural)]

    def crash_point(self, predicate: Callable[[str, str], bool]) -> threading.Event:
        """Requests ``(method, path)`` that match wait until the returned event is set, then are dropped
        without being applied; ``held`` is set while one waits."""
        release = threading.Event()
        self.holds.append((predicate, release))
        return release

    def remove(self, group: str, plural: str, namespace: str, name: str) -> None:
        """Delete an object behind the operator's back (watchers see DELETED)."""
        with self.lock:
            obj = self.objects.pop((group, plural, namespace, name))
            self.rv += 1
            self.log.append((self.rv, "DELETED", (group, plural, namespace, name), obj))
            self.lock.notify_all()

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s}s; requests: {self.requests[-20:]}")
            time.sleep(0.05)

    def rbac(self) -> set[tuple[str, str, str]]:
        return {r for _, _, r, _ in self.requests if r is not None}

    # --- the API ------------------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: bytes) -> tuple[int, Any, list[bytes] | None]:
        url = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/")
        discovery = self._discovery(path)
        if discovery is not None:
            self.requests.append((method, path, None, ""))
            return 200, discovery, None
        m = _PATH.match(path)
        if not m:
            self.requests.append((method, path, ("?", path, method.lower()), ""))
            return 404, _status(404, f"no route {path}"), None
        group = "" if m["core"] else m["group"]
        plural, ns, name, sub = m["plural"], m["ns"] or "", m["name"], m["sub"]
        watch = query.get("watch") in ("true", "1")
        verb = {"GET": ("watch" if watch else "list") if name is None else "get", "POST": "create",
                "PATCH": "patch", "PUT": "update", "DELETE": "delete" if name else "deletecollection"}[method]
        resource = f"{plural}/{sub}" if sub else plural
        self.requests.append((method, path, (group, resource, verb), ns))
        if self.authorize is not None and not self.authorize((group, resource, verb, ns)):
            self.denied.append((group, resource, verb, ns))
            return 403, _status(403, f"{group}/{resource} {verb} in {ns or 'the cluster'} is forbidden",
                                "Forbidden"), None
        for predicate, release in self.holds:
            if predicate(method, path) and not release.is_set():
                self.held.set()
                release.wait(120)
                return 0, None, None  # dropped: the operator died waiting for it
        data = json.loads(body) if body else None
        with self.lock:
            if verb == "watch":
                return 200, None, self._watch(group, plural, ns, int(query.get("resourceVersion") or 0),
                                              float(query.get("timeoutSeconds") or 1))
            if verb == "list":
                items = [copy.deepcopy(o) for (g, p, n, _), o in self.objects.items()
                         if (g, p) == (group, plural) and (not ns or n == ns)]
                return 200, {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)},
                             "items": items}, None
            if verb == "create" and not (data or {}).get("metadata", {}).get("name"):
                data["metadata"]["name"] = data["metadata"].get("generateName", "") + uuid.uuid4().hex[:5]
            key = (group, plural, ns, name or (data or {}).get("metadata", {}).get("name", ""))
            current = self.objects.get(key)
            if verb == "get":
                return (200, copy.deepcopy(current), None) if current else (404, _status(404, f"{key} not found"), None)
            if verb == "create":
                if current is not None:
                    return 409, _status(409, f"{key} already exists", "AlreadyExists"), None
                if not self._owner_finalizers(data, method, path, ns):
                    return 403, _status(403, "cannot set blockOwnerDeletion", "Forbidden"), None
                self.creates.append(key)
                return 201, self._store(group, plural, ns, data, "ADDED"), None
            if verb == "patch":
                if current is None:
                    return 404, _status(404, f"{key} not found"), None
                if sub == "status":
                    new = merge_patch(current, {"status": (data or {}).get("status")})
                else:
                    if "status" in self._subresources(group, plural):  # status only through its subresource
                        data = {k: v for k, v in (data or {}).items() if k != "status"}
                    if not self._owner_finalizers(data, method, path, ns):
                        return 403, _status(403, "cannot set blockOwnerDeletion", "Forbidden"), None
                    new = merge_patch(current, data)
                    if new.get("spec") != current.get("spec"):
                        new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
                return 200, self._store(group, plural, ns, new, "MODIFIED"), None
            return 405, _status(405, f"{method} not supported by the fake"), None

    @staticmethod
    def _subresources(group: str, plural: str) -> tuple[str, ...]:
        for listed in RESOURCES.get(group, {}).values():
            for p, _, _, subs in listed:
                if p == plural:
                    return subs
        return ()

    def _owner_finalizers(self, data: Any, method: str, path: str, ns: str) -> bool:
        for ref in ((data or {}).get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("blockOwnerDeletion"):
                group = ref["apiVersion"].rpartition("/")[0]
                plural = next(p for p, kind, _, _ in RESOURCES[group][ref["apiVersion"].rpartition("/")[2]]
                              if kind == ref["kind"])
                need = (group, f"{plural}/finalizers", "update", ns)
                self.requests.append((method, path, need[:3], ns))
                if self.authorize is not None and not self.authorize(need):
                    self.denied.append(need)
                    return False
        return True

    def _watch(self, group: str, plural: str, ns: str, since: int, timeout_s: float) -> list[bytes]:
        deadline = time.monotonic() + min(timeout_s, 1.0)
        while True:
            events = [e for e in self.log if e[0] > since and e[2][:2] == (group, plural) and (not ns or e[2][2] == ns)]
            if events or time.monotonic() >= deadline:
                break
            self.lock.wait(max(0.0, deadline - time.monotonic()))
        return [json.dumps({"type": typ, "object": obj}).encode() + b"\n" for _, typ, _, obj in events]

    def _discovery(self, path: str) -> Any:
        if path == "/version":
            return {"major": "1", "minor": "35", "gitVersion": "v1.35.0-fake"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{next(iter(vs))}", "version": next(iter(vs))}}
                for g, vs in RESOURCES.items() if g]}
        m = re.match(r"^/(?:api/(v1)|apis/([^/]+)/([^/]+))$", path)
        if not m:
            return None
        group, version = ("", "v1") if m[1] else (m[2], m[3])
        listed = RESOURCES.get(group, {}).get(version)
        if listed is None:
            return None
        resources = []
        for plural, kind, namespaced, subs in listed:
            resources.append({"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                              "verbs": ALL_VERBS})
            resources += [{"name": f"{plural}/{s}", "singularName": "", "namespaced": namespaced, "kind": kind,
                           "verbs": ["get", "patch", "update"]} for s in subs]
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


def _status(code: int, message: str, reason: str = "NotFound") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                code, payload, stream = api.handle(self.command, self.path, body)
            except Exception as e:  # a bug in the fake must show, not hang the operator
                code, payload, stream = 500, _status(500, f"fake: {type(e).__name__}: {e}", "InternalError"), None
            if code == 0:  # dropped
                self.close_connection = True
                return
            data = b"".join(stream) if stream is not None else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if stream is not None:
                self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the operator stopped watching
                self.close_connection = True
            if stream is not None:
                self.close_connection = True

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


# --- the real operator process against the fake -------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_operator(api: FakeApiServer, folder: Path, args: list[str], log_name: str = "operator.log") -> Any:
    """``dgserve operator run ARGS`` in its own process with a kubeconfig naming the fake; the liveness
    endpoint moves to a free loopback port."""
    import os
    import subprocess
    import sys

    args = [a if not a.startswith("--liveness=") else f"--liveness=http://127.0.0.1:{free_port()}/healthz"
            for a in args]
    env = dict(os.environ, KUBECONFIG=str(api.kubeconfig(folder)), POD_ID=f"test-{uuid.uuid4().hex[:6]}")
    env.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster configuration
    with (folder / log_name).open("w") as out:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "dgserve.cli", "operator", "run", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = folder / log_name
    return proc


def stop_operator(proc: Any, *, kill: bool = False) -> None:
    """SIGKILL (a crash) or SIGTERM (kopf stops cleanly); bounded."""
    import subprocess

    if proc.poll() is None:
        (proc.kill if kill else proc.terminate)()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
