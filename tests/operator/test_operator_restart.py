"""The operator killed mid-reconcile resumes and converges, without duplicate objects.

The real ``dgserve operator run`` process (kopf and the official ``kubernetes`` client) works against a
recording fake API server (tests/operator/fake_apiserver.py; a double because no kube-apiserver can run
on CI machines). At a chosen request of its first reconcile the fake holds the request, the test kills
the operator with SIGKILL (no clean shutdown) and the held request is dropped unapplied, as if the
process died before sending it. A second operator process then starts on the same objects: kopf's
resume/create handling must bring the DiffusionGemma to the same end state an uninterrupted run reaches
(one RayService equal to the rendered one, created once, status written, kopf's progress annotations
cleared), without creating anything twice or patching what is already right.

Crash points: before the RayService exists (its create is dropped), after it exists but before the
status is written, and after the status but before kopf records the handler as done. Standalone
operators (the chart's ``peering.enabled=false`` install, Recreate strategy); one slow case with the
chart's default peering, where the new operator first waits for the dead one's peering entry to expire.
"""

from __future__ import annotations

import time

import pytest
from fake_apiserver import FakeApiServer, start_operator, stop_operator

from dgserve.operator import names
from dgserve.operator.render import render
from operator_testlib import REPO_ROOT, load_yaml_docs

pytestmark = [pytest.mark.timeout(400)]

NS, NAME = "ml", "gemma"
DG = (names.GROUP, names.PLURAL)
RS = (names.RAY_GROUP, names.RAYSERVICE_PLURAL)
DG_PATH = f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{NS}/{names.PLURAL}/{NAME}"
RS_PATH = f"/apis/{names.RAY_GROUP}/{names.RAY_VERSION}/namespaces/{NS}/{names.RAYSERVICE_PLURAL}"
LAST_HANDLED = f"{names.KOPF_PREFIX}/last-handled-configuration"


def example() -> dict:
    (doc,) = load_yaml_docs(REPO_ROOT / "deploy/diffusiongemma.yaml")
    doc["metadata"].update(name=NAME, namespace=NS)
    return doc


def status_written(api: FakeApiServer) -> bool:
    return ((api.get(*DG, NS, NAME) or {}).get("status") or {}).get("observedGeneration") == 1


CRASH_POINTS = {
    # (method, path) predicates; api is bound when the point is armed
    "before-create": lambda api: lambda m, p: m == "POST" and p == RS_PATH,
    "after-create": lambda api: lambda m, p: m == "PATCH" and p == f"{DG_PATH}/status",
    "after-status": lambda api: lambda m, p: m == "PATCH" and p == DG_PATH and status_written(api),
}


def converged(api: FakeApiServer) -> bool:
    dg = api.get(*DG, NS, NAME) or {}
    annotations = (dg.get("metadata") or {}).get("annotations") or {}
    return bool(api.get(*RS, NS, NAME)) and status_written(api) and LAST_HANDLED in annotations


def crash_and_resume(api: FakeApiServer, folder, point: str, args: list[str], resume_timeout_s: float) -> dict:
    api.put("", "namespaces", "", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    api.put(*DG, NS, example())
    release = api.crash_point(CRASH_POINTS[point](api))
    first = start_operator(api, folder, args, "first.log")
    try:
        api.wait_for(api.held.is_set, 120, f"the first operator reaching {point}")
    finally:
        stop_operator(first, kill=True)
    release.set()  # the held request is dropped: it never reached the "API server"
    at_crash = {"rayservice": api.get(*RS, NS, NAME) is not None, "status": status_written(api),
                "requests": len(api.requests)}
    t0 = time.monotonic()
    second = start_operator(api, folder, args, "second.log")
    try:
        api.wait_for(lambda: converged(api), resume_timeout_s, "the restarted operator converging")
        time.sleep(2)  # let it settle: nothing more may happen
    except AssertionError:
        print((folder / "second.log").read_text()[-5000:])
        raise
    finally:
        stop_operator(second)
    return dict(at_crash, resume_s=time.monotonic() - t0)


def check_converged(api: FakeApiServer, at_crash: dict) -> None:
    dg = api.get(*DG, NS, NAME)
    rayservices = api.of(*RS)
    assert [r["metadata"]["name"] for r in rayservices] == [NAME]  # exactly one
    assert [c for c in api.creates if c[:2] == RS] == [(*RS, NS, NAME)]  # created once, by whichever operator
    (rendered,) = render(dg)
    assert rayservices[0]["spec"] == rendered["spec"]  # the same as an uninterrupted reconcile
    assert rayservices[0]["metadata"]["ownerReferences"] == rendered["metadata"]["ownerReferences"]
    status = dg["status"]
    assert status["observedGeneration"] == 1 and {c["type"] for c in status["conditions"]} >= {"Ready"}
    annotations = dg["metadata"].get("annotations") or {}
    leftovers = [k for k in annotations if k.startswith(f"{names.KOPF_PREFIX}/") and k != LAST_HANDLED
                 and k != f"{names.KOPF_PREFIX}/kopf-managed"]  # kopf's marker, not progress
    assert not leftovers, f"kopf progress left behind: {leftovers}"
    after = api.requests[at_crash["requests"]:]
    rs_writes = [(m, p) for m, p, r, _ in after if r and r[:2] == RS and r[2] in ("create", "patch", "update")]
    if at_crash["rayservice"]:
        assert not rs_writes, f"the restarted operator rewrote a RayService that was already right: {rs_writes}"
    else:
        assert rs_writes == [("POST", RS_PATH)], rs_writes


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_killed_mid_reconcile_resumes_and_converges(tmp_path, point):
    with FakeApiServer() as api:
        at_crash = crash_and_resume(api, tmp_path, point, ["--standalone"], resume_timeout_s=120)
        print(f"\n{point}: at the crash {at_crash}")
        assert at_crash["rayservice"] == (point != "before-create")
        assert at_crash["status"] == (point == "after-status")
        check_converged(api, at_crash)


@pytest.mark.slow
def test_killed_with_peering_resumes_once_the_dead_peer_expires(tmp_path):
    """The chart's default install: the new operator pauses while the killed one's keep-alive entry in the
    ClusterKopfPeering is fresh (same priority), then resumes and converges."""
    with FakeApiServer() as api:
        api.put("kopf.dev", "clusterkopfpeerings", "", {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                                          "metadata": {"name": "dgserve"}})
        at_crash = crash_and_resume(api, tmp_path, "after-create", ["--peering=dgserve", "--priority=100"],
                                    resume_timeout_s=240)
        print(f"\npeering, after-create: at the crash {at_crash}")
        check_converged(api, at_crash)
