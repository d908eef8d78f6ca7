"""The operator's RBAC is least privilege: every Kubernetes API call the operator makes is granted by the
chart's roles, in the scope it is made in, and every granted permission is used.

What the operator asks for is recorded, not assumed: the real ``dgserve operator run`` process (kopf and
the official ``kubernetes`` client), started with the arguments of the chart's own Deployment, runs a
scenario against a recording fake API server (tests/operator/fake_apiserver.py; a double because no
kube-apiserver can run on CI machines): a valid DiffusionGemma (RayService created, KubeRay's status
mirrored, a spec edit patched, the RayService deleted behind its back and created again) and an invalid
one (InvalidSpec status, an error event). Every request becomes the RBAC triple it needs
(apiGroup, resource, verb) with its namespace; setting ``blockOwnerDeletion`` counts as ``update`` on the
owner's finalizers, as the API server's admission plugin demands. A static scan of operator/ checks that
no API method of the ``kubernetes`` client is called that the scenario did not exercise.

The grants come from ``helm template`` of charts/dgserve-operator (cluster-wide and per-namespace
installs) and from deploy/operator.yaml (the generated default install).
"""

from __future__ import annotations

import ast
import copy
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from fake_apiserver import FakeApiServer, start_operator, stop_operator

from dgserve.operator import manifests, names
from operator_testlib import REPO_ROOT, load_yaml_docs

pytestmark = [pytest.mark.timeout(300)]

NS = "ml"
DG = (names.GROUP, names.PLURAL)
RS = (names.RAY_GROUP, names.RAYSERVICE_PLURAL)
KOPF_NAMESPACED = ("kopf.dev", "kopfpeerings")
KOPF_CLUSTER = ("kopf.dev", "clusterkopfpeerings")
INSTALLS = {"cluster-wide": (), "per-namespace": (f"watchNamespaces={{{NS}}}",), "standalone": ("peering.enabled=false",)}

# The kubernetes client's API methods operator/ may call, as the request each one makes (resource
# and subresource are filled in from the call's constant arguments).
CLIENT_METHODS = {
    "get_api_resources": None,  # discovery: open to every authenticated user
    "get_namespaced_custom_object": "get",
    "create_namespaced_custom_object": "create",
    "patch_namespaced_custom_object": "patch",
    "patch_namespaced_custom_object_status": "patch",
}


def template(helm: str, *sets: str) -> list[dict]:
    cmd = [helm, "template", manifests.RELEASE, str(REPO_ROOT / manifests.CHART), "--namespace", manifests.NAMESPACE]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def grants(docs: list[dict]) -> set[tuple[str, str, str, str]]:
    """(apiGroup, resource, verb, scope): scope "*" for a ClusterRoleBinding, else the RoleBinding's namespace."""
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("ClusterRole", "Role")}
    out = set()
    for b in docs:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        scope = "*" if b["kind"] == "ClusterRoleBinding" else b["metadata"]["namespace"]
        for rule in roles[b["roleRef"]["name"]]["rules"]:
            out |= {(g, r, v, scope) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def allowed(request: tuple[str, str, str, str], granted: set[tuple[str, str, str, str]]) -> bool:
    g, r, v, ns = request
    return (g, r, v, "*") in granted or (ns != "" and (g, r, v, ns) in granted)


def operator_args(docs: list[dict]) -> list[str]:
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["dgserve", "operator", "run"]
    return c["args"]


def example(name: str) -> dict:
    (doc,) = load_yaml_docs(REPO_ROOT / "deploy/diffusiongemma.yaml")
    doc["metadata"].update(name=name, namespace=NS)
    return doc


def kuberay_status(generation: int) -> dict:
    deployments = {d: {"status": "HEALTHY"} for d in (names.DIFFUSION_DEPLOYMENT, names.FALLBACK_DEPLOYMENT,
                                                       names.ROUTER_DEPLOYMENT)}
    return {"observedGeneration": generation, "serviceStatus": "Running",
            "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": ""}],
            "activeServiceStatus": {"rayClusterName": "gemma-abcde", "applicationStatuses": {
                "dgserve": {"status": "RUNNING", "message": "", "serveDeploymentStatuses": deployments}}}}


def condition(obj: dict | None, kind: str) -> dict | None:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def run_scenario(api: FakeApiServer, folder: Path, args: list[str]) -> None:
    """Everything the operator does for its users, against ``api``; returns when all of it was seen."""
    api.put(*DG, NS, example("gemma"))
    bad = example("bad")
    bad["spec"]["replicas"] = {"min": 3, "max": 2}
    api.put(*DG, NS, bad)
    proc = start_operator(api, folder, args)
    try:
        t0 = time.monotonic()

        def wait(predicate, timeout_s, what):
            out = api.wait_for(predicate, timeout_s, what)
            print(f"{what}: {time.monotonic() - t0:.1f}s")
            return out
        wait(lambda: api.get(*RS, NS, "gemma"), 120, "RayService created")
        wait(lambda: condition(api.get(*DG, NS, "bad"), "Ready"), 60, "InvalidSpec status")
        wait(lambda: (api.get(*DG, NS, "gemma").get("status") or {}).get("observedGeneration") == 1, 60,
             "first status written")
        # KubeRay reports the RayService ready: the operator mirrors it into the DiffusionGemma
        rs = api.get(*RS, NS, "gemma")
        api.put(*RS, NS, dict(rs, status=kuberay_status(rs["metadata"]["generation"])), event="MODIFIED")
        wait(lambda: (condition(api.get(*DG, NS, "gemma"), "Ready") or {}).get("status") == "True", 60,
             "Ready mirrored")
        # a spec edit: the RayService is patched
        dg = api.get(*DG, NS, "gemma")
        edited = copy.deepcopy(dg)
        edited["spec"]["maxBatchPerReplica"] = 8 if dg["spec"].get("maxBatchPerReplica") != 8 else 4
        edited["metadata"]["generation"] += 1
        api.put(*DG, NS, edited, event="MODIFIED")
        wait(lambda: api.get(*RS, NS, "gemma")["metadata"]["generation"] > rs["metadata"]["generation"], 60,
             "RayService patched")
        # the RayService deleted behind the operator's back: created again
        api.remove(*RS, NS, "gemma")
        wait(lambda: api.get(*RS, NS, "gemma"), 60, "RayService created again")
        wait(lambda: any(r == ("", "events", "create") for _, _, r, _ in api.requests), 60, "an event posted")
        wait(lambda: any(r and r[0] == "kopf.dev" and r[2] == "patch" for _, _, r, _ in api.requests)
             or "--standalone" in args, 60, "peering keep-alive")
    except AssertionError:
        print(proc.log.read_text()[-6000:])
        raise
    finally:
        stop_operator(proc)


def static_calls() -> set[tuple[str, str | None]]:
    """(client method, plural constant name) for every ``kubernetes`` client API call in operator/."""
    found = set()
    for path in sorted((REPO_ROOT / "operator").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "_custom":
                plural = next((a.attr for a in node.args if isinstance(a, ast.Attribute) and
                               a.attr in ("PLURAL", "RAYSERVICE_PLURAL")), None)
                found.add((node.func.attr, plural))
            if isinstance(node, ast.Attribute) and node.attr.endswith("Api") and \
                    isinstance(node.value, ast.Name) and node.value.id == "client":
                assert node.attr == "CustomObjectsApi", f"{path.name}: new API class {node.attr}: extend this test"
    return found


def test_static_scan_knows_every_client_call():
    calls = static_calls()
    assert {m for m, _ in calls} <= set(CLIENT_METHODS), calls
    expected = {("get_api_resources", None), ("get_namespaced_custom_object", "PLURAL"),
                ("get_namespaced_custom_object", "RAYSERVICE_PLURAL"),
                ("create_namespaced_custom_object", "RAYSERVICE_PLURAL"),
                ("patch_namespaced_custom_object", "RAYSERVICE_PLURAL"),
                ("patch_namespaced_custom_object_status", "PLURAL")}
    assert calls == expected, calls ^ expected  # a new call must be added here and to the scenario


@pytest.mark.parametrize("install", sorted(INSTALLS))
def test_rbac_grants_exactly_what_the_operator_uses(helm, tmp_path, install):
    docs = template(helm, *INSTALLS[install])
    granted = grants(docs)
    args = operator_args(docs)
    with FakeApiServer(authorize=lambda r: allowed(r, granted)) as api:  # 403 for what the roles do not grant
        api.put("", "namespaces", "", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        if "--namespace=" + NS in args:
            api.put(*KOPF_NAMESPACED, NS, {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                           "metadata": {"name": "dgserve"}})
        else:
            api.put(*KOPF_CLUSTER, "", {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                        "metadata": {"name": "dgserve"}})
        try:
            run_scenario(api, tmp_path, args)
        except AssertionError as e:
            raise AssertionError(f"the operator did not get through its work; denied: {sorted(set(api.denied))}") from e
        used = {(*r, ns) for _, _, r, ns in api.requests if r is not None}
    assert not [r for r in used if r[0] == "?"], "requests the fake could not classify"
    # the static scan's calls were all exercised
    groups = {"PLURAL": DG, "RAYSERVICE_PLURAL": RS}
    for method, plural in static_calls():
        if CLIENT_METHODS[method] is None:
            continue
        group, res = groups[plural]
        res += "/status" if method.endswith("_status") else ""
        assert any(u[:3] == (group, res, CLIENT_METHODS[method]) for u in used), (method, plural)
    missing = sorted(set(api.denied))
    used_triples = {u[:3] for u in used if allowed(u, granted)}
    unused = sorted({g[:3] for g in granted} - used_triples)
    print(f"\n{install}: used {sorted(used_triples)}")
    assert not missing, f"the operator needs permissions the chart does not grant: {missing}"
    assert not unused, f"the chart grants permissions the operator never uses: {unused}"
    # the namespaced install never needs cluster-wide rights on workloads
    if install == "per-namespace":
        assert {u[3] for u in used if u[:2] in (DG, RS, ("", "events"))} == {NS}


def test_generated_deploy_manifest_is_the_cluster_wide_install(helm):
    """deploy/operator.yaml grants the same as the chart's default install the test above ran."""
    generated = [d for d in load_yaml_docs(REPO_ROOT / "deploy/operator.yaml")]
    assert grants(generated) == grants(template(helm))
