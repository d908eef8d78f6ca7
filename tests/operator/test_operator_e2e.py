"""End to end against a real cluster: install the CRDs, run the operator, apply the example,
wait for the RayService, check status, the API server's validation, a spec edit and deletion.

Runs only when KUBECONFIG names a cluster (any conformant one: kind, k3d, a cloud cluster);
skipped otherwise, since no kube-apiserver can run on CI machines. With KubeRay installed the
RayService is created and garbage-collected with its DiffusionGemma; without it the resource
must report Degraded=True/KubeRayMissing. GPUs are not needed: nothing waits for Ray pods.
Waits use ``kubectl wait`` (watch-based, with a deadline), never sleeps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from dgserve.operator import names
from dgserve.operator.tools import ensure_tool
from operator_testlib import REPO_ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TIMEOUT = "180s"


@pytest.fixture(scope="module")
def kubectl():
    config = os.environ.get("KUBECONFIG")
    if not config or not all(Path(p).is_file() for p in config.split(os.pathsep) if p):
        pytest.skip("no live cluster: set KUBECONFIG to a cluster's kubeconfig to run the operator end to end")
    binary = str(ensure_tool("kubectl"))

    def run(*args, check=True, input=None):
        proc = subprocess.run([binary, *args], capture_output=True, text=True, input=input, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc

    run("version", "--request-timeout=20s")  # a given kubeconfig must work: fail, don't skip
    return run


@pytest.fixture(scope="module")
def namespace(kubectl):
    run = kubectl
    run("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "deploy/crds"))
    run("wait", "--for=condition=Established", f"crd/{names.CRD_NAME}", f"--timeout={TIMEOUT}")
    ns = f"dgserve-e2e-{uuid.uuid4().hex[:6]}"
    run("create", "namespace", ns)
    yield ns
    run("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator_process(namespace, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dgserve.cli", "operator", "run", "--standalone",
                                 "--namespace", namespace, "--liveness", f"http://127.0.0.1:{port}/healthz"],
                                stdout=out, stderr=subprocess.STDOUT)
    yield proc, log
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def kuberay_installed(kubectl) -> bool:
    return kubectl("get", "crd", f"{names.RAYSERVICE_PLURAL}.{names.RAY_GROUP}", check=False).returncode == 0


def example(namespace: str) -> dict:
    (doc,) = yaml.safe_load_all((REPO_ROOT / "deploy/diffusiongemma.yaml").read_text())
    doc["metadata"].update(name="gemma-e2e", namespace=namespace)
    return doc


def test_api_server_refuses_invalid_specs(kubectl, namespace):
    bad = example(namespace)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["replicas"] = {"min": 3, "max": 2}
    proc = kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert proc.returncode != 0 and "min 3 must be <= max 2" in proc.stderr
    bad["spec"]["replicas"] = {"min": 1, "max": 1}
    bad["spec"]["maxBatchPerReplica"] = 9
    proc = kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert proc.returncode != 0 and "maxBatchPerReplica" in proc.stderr


def test_example_lifecycle(kubectl, namespace, operator_process):
    proc, log = operator_process
    doc = example(namespace)
    kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    dg = f"{names.SINGULAR}/{doc['metadata']['name']}"
    ns = ["-n", namespace]
    try:
        kubectl("wait", *ns, "--for=jsonpath={.status.observedGeneration}=1", dg, f"--timeout={TIMEOUT}")
        if not kuberay_installed(kubectl):
            kubectl("wait", *ns, "--for=condition=Degraded", dg, f"--timeout={TIMEOUT}")
            status = json.loads(kubectl("get", *ns, dg, "-o", "json").stdout)["status"]
            degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
            assert degraded["reason"] == "KubeRayMissing"
            return

        rs = f"{names.RAYSERVICE_PLURAL}.{names.RAY_GROUP}/{doc['metadata']['name']}"
        kubectl("wait", *ns, "--for=create", rs, f"--timeout={TIMEOUT}")
        body = json.loads(kubectl("get", *ns, dg, "-o", "json").stdout)
        rayservice = json.loads(kubectl("get", *ns, rs, "-o", "json").stdout)
        (owner,) = rayservice["metadata"]["ownerReferences"]
        assert owner["uid"] == body["metadata"]["uid"] and owner["controller"] is True
        status = body["status"]  # survived the API server (no pruning)
        assert {c["type"] for c in status["conditions"]} == {
            "Ready", "ContextVerified", "FallbackReady", "UpgradeInProgress", "Degraded"}
        assert status["promisedContextLength"] == 262144 and status["rayService"] == doc["metadata"]["name"]
        header = kubectl("get", *ns, "dg").stdout.splitlines()[0].split()
        assert header[:5] == ["NAME", "READY", "REPLICAS", "CONTEXT", "AGE"]

        # a spec edit is patched into the RayService (KubeRay upgrades the app in place)
        kubectl("patch", *ns, dg, "--type=merge", "-p", '{"spec": {"maxBatchPerReplica": 1}}')
        kubectl("wait", *ns, "--for=jsonpath={.status.observedGeneration}=2", dg, f"--timeout={TIMEOUT}")
        serve_config = json.loads(kubectl("get", *ns, rs, "-o", "json").stdout)["spec"]["serveConfigV2"]
        assert "max_batch: 1" in serve_config

        # deletion leaves nothing behind (garbage collection through the owner reference)
        kubectl("delete", *ns, dg, f"--timeout={TIMEOUT}")
        kubectl("wait", *ns, "--for=delete", rs, f"--timeout={TIMEOUT}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- operator log (tail) ---\n{log.read_text()[-4000:]}") from e
    assert proc.poll() is None, f"operator exited: {log.read_text()[-4000:]}"
