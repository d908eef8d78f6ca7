"""Reconcile steps and kopf handlers against a recording double of the Kubernetes API.

A double (operator_testlib.FakeKube), because no kube-apiserver can run on CI machines (see
DESIGN.md); the real API path is covered by test_operator_e2e.py when a KUBECONFIG is given.
The double applies merge patches, bumps generations on spec changes, adds server-side defaults
and prunes status by our CRD's schema, so "nothing when equal" and "status survives" are real.
"""

from __future__ import annotations

import copy
import json

import kopf
import pytest
import yaml

from dgserve.operator import handlers, names
from dgserve.operator.errors import ApiRejectedError, InvalidSpecError, KubeRayMissingError, TransientApiError
from dgserve.operator.kube import map_api_error
from dgserve.operator.reconcile import Action, reconcile, refresh_status
from operator_testlib import FakeKube

NS, NAME = "ml", "gemma"
SPEC = {"model": {"pvc": {"claimName": "models", "path": "dg"}}, "security": {"allowPlaintext": True},
        "contextLength": 131072,
        "fallback": {"type": "InCluster", "contextLength": 131072}}


class Clock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> str:
        self.t += 1
        return f"2026-01-01T00:00:{self.t:02d}Z"


@pytest.fixture
def kube():
    return FakeKube()


@pytest.fixture
def clock():
    return Clock()


def dg(kube, spec=None, generation=1):
    body = {"apiVersion": names.API_VERSION, "kind": names.KIND,
            "metadata": {"name": NAME, "namespace": NS, "uid": "dg-uid", "generation": generation},
            "spec": copy.deepcopy(spec or SPEC)}
    existing = kube.diffusiongemmas.get((NS, NAME))
    if existing and "status" in existing:
        body["status"] = existing["status"]
    return kube.add_diffusiongemma(body)


def status(kube):
    return kube.diffusiongemmas[(NS, NAME)]["status"]


def cond(kube, type_):
    return next(c for c in status(kube)["conditions"] if c["type"] == type_)


def rs_status(app="RUNNING", ready="True", deployments=None, generation=1, pending=None, app_message="",
              upgrade=None):
    deployments = deployments if deployments is not None else {
        names.DIFFUSION_DEPLOYMENT: {"status": "HEALTHY"}, names.FALLBACK_DEPLOYMENT: {"status": "HEALTHY"},
        names.ROUTER_DEPLOYMENT: {"status": "HEALTHY"}}
    out = {"observedGeneration": generation, "serviceStatus": "Running" if ready == "True" else "",
           "conditions": [{"type": "Ready", "status": ready, "reason": "NonZeroServeEndpoints" if ready == "True"
                           else "Initializing", "message": ""}],
           "activeServiceStatus": {"rayClusterName": "gemma-abcde", "applicationStatuses": {"dgserve": {
               "status": app, "message": app_message, "serveDeploymentStatuses": deployments}}}}
    if upgrade:
        out["conditions"].append({"type": "UpgradeInProgress", "status": "True",
                                  "reason": "BothActivePendingClustersExist"})
    if pending:
        out["pendingServiceStatus"] = pending
    return out


# --- apply: create, patch, nothing ------------------------------------------------------------------


def test_creates_the_rayservice_when_missing(kube, clock):
    assert reconcile(dg(kube), kube, now=clock) is Action.CREATED
    assert [c[0] for c in kube.writes()] == ["create_rayservice", "patch_status"]
    rs = kube.rayservices[(NS, NAME)]
    assert rs["metadata"]["ownerReferences"][0]["uid"] == "dg-uid"
    st = status(kube)
    assert st["observedGeneration"] == 1 and st["rayService"] == NAME
    ready = cond(kube, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Deploying")


def test_nothing_written_when_equal(kube, clock):
    kube.server_defaults = {"upgradeStrategy": {"type": "NewCluster", "clusterUpgradeOptions": None}}
    reconcile(dg(kube), kube, now=clock)
    kube.calls.clear()
    assert reconcile(dg(kube), kube, now=clock) is Action.UNCHANGED
    assert kube.writes() == []  # no RayService patch, no status write


def test_api_server_defaults_do_not_cause_patches(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    stored = kube.rayservices[(NS, NAME)]
    for g in stored["spec"]["rayClusterConfig"]["workerGroupSpecs"]:  # defaulted by the API server
        g["template"]["spec"]["containers"][0]["ports"][0]["protocol"] = "TCP"
        g["numOfHosts"] = 1
    kube.calls.clear()
    assert reconcile(dg(kube), kube, now=clock) is Action.UNCHANGED


def test_spec_edit_patches_the_rayservice(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    kube.calls.clear()
    edited = dict(SPEC, maxBatchPerReplica=8)
    assert reconcile(dg(kube, edited, generation=2), kube, now=clock) is Action.PATCHED
    (patch_call,) = [c for c in kube.writes() if c[0] == "patch_rayservice"]
    patch = json.loads(patch_call[3])
    assert "max_batch: 8" in patch["spec"]["serveConfigV2"]
    assert "rayClusterConfig" not in patch["spec"]  # serve-only change: KubeRay updates the app in place
    rs = kube.rayservices[(NS, NAME)]
    assert "max_batch: 8" in rs["spec"]["serveConfigV2"] and rs["metadata"]["generation"] == 2
    assert status(kube)["observedGeneration"] == 2
    upgrade = cond(kube, "UpgradeInProgress")
    assert (upgrade["status"], upgrade["reason"]) == ("True", "Applying")  # KubeRay has not seen it yet


def test_removed_settings_are_removed_from_the_rayservice(kube, clock):
    reconcile(dg(kube, dict(SPEC, nodeSelector={"pool": "gpu"})), kube, now=clock)
    pod = kube.rayservices[(NS, NAME)]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    reconcile(dg(kube, SPEC, generation=2), kube, now=clock)
    pod = kube.rayservices[(NS, NAME)]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nodeSelector" not in pod


def test_manual_drift_is_reverted(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    kube.rayservices[(NS, NAME)]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 9
    assert reconcile(dg(kube), kube, now=clock) is Action.PATCHED
    assert kube.rayservices[(NS, NAME)]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 1


def test_adopts_an_unowned_rayservice(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    kube.rayservices[(NS, NAME)]["metadata"].pop("ownerReferences")
    assert reconcile(dg(kube), kube, now=clock) is Action.PATCHED
    assert kube.rayservices[(NS, NAME)]["metadata"]["ownerReferences"][0]["uid"] == "dg-uid"


def test_refuses_a_rayservice_controlled_by_someone_else(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    kube.rayservices[(NS, NAME)]["metadata"]["ownerReferences"] = [
        {"apiVersion": "x/v1", "kind": "Other", "name": "o", "uid": "other", "controller": True}]
    kube.calls.clear()
    with pytest.raises(InvalidSpecError, match="controlled by Other o"):
        reconcile(dg(kube), kube, now=clock)
    assert [c[0] for c in kube.writes()] == ["patch_status"]
    assert cond(kube, "Degraded")["reason"] == "InvalidSpec"


# --- status mapping from KubeRay ----------------------------------------------------------------------


def test_status_ready(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    kube.set_rayservice_status(NS, NAME, rs_status())
    assert reconcile(dg(kube), kube, now=clock) is Action.UNCHANGED
    st = status(kube)
    assert cond(kube, "Ready")["status"] == "True" and cond(kube, "Ready")["reason"] == "Serving"
    assert cond(kube, "ContextVerified")["status"] == "True"
    assert cond(kube, "FallbackReady")["status"] == "True"
    assert cond(kube, "UpgradeInProgress")["status"] == "False"
    assert cond(kube, "Degraded")["status"] == "False"
    assert st["servedContextLength"] == 131072 and st["promisedContextLength"] == 131072
    assert st["replicas"] == "1/1" and st["readyReplicas"] == 1
    assert st["endpoint"] == f"{NAME}.{NS}.svc:9000"
    assert st["applicationStatus"] == "RUNNING" and st["serviceStatus"] == "Running"


def test_status_deploying(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    kube.set_rayservice_status(NS, NAME, rs_status(app="DEPLOYING", ready="False", deployments={
        names.DIFFUSION_DEPLOYMENT: {"status": "UPDATING", "message": "loading weights"}}))
    reconcile(dg(kube), kube, now=clock)
    assert cond(kube, "Ready")["status"] == "False" and cond(kube, "Ready")["reason"] == "Deploying"
    assert cond(kube, "ContextVerified")["status"] == "Unknown"
    assert cond(kube, "FallbackReady")["reason"] == "FallbackPending"
    assert cond(kube, "Degraded")["status"] == "False"
    assert status(kube)["replicas"] == "0/1" and "servedContextLength" not in status(kube)


def test_status_failed(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    kube.set_rayservice_status(NS, NAME, rs_status(app="DEPLOY_FAILED", ready="False",
                                                   app_message="ImportError: no module dgserve.serving.app"))
    reconcile(dg(kube), kube, now=clock)
    assert cond(kube, "Ready")["reason"] == "DeployFailed"
    assert "ImportError" in cond(kube, "Ready")["message"]
    degraded = cond(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "DeployFailed")


def test_status_context_too_short(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    msg = "context verification failed: backend=diffusion promised=131072 served=8192 (cause kv_memory)"
    kube.set_rayservice_status(NS, NAME, rs_status(app="DEPLOY_FAILED", ready="False", app_message=msg))
    reconcile(dg(kube), kube, now=clock)
    ctx = cond(kube, "ContextVerified")
    assert ctx["status"] == "False" and ctx["reason"] == "ContextTooShort"
    assert "8192" in ctx["message"] and "131072" in ctx["message"]
    assert cond(kube, "Ready")["reason"] == "ContextTooShort"
    assert cond(kube, "Degraded")["reason"] == "ContextTooShort"
    assert status(kube)["servedContextLength"] == 8192


def test_status_fallback_context_too_short(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    kube.set_rayservice_status(NS, NAME, rs_status(app="DEPLOYING", ready="False", deployments={
        names.DIFFUSION_DEPLOYMENT: {"status": "HEALTHY"},
        names.FALLBACK_DEPLOYMENT: {"status": "UNHEALTHY", "message": "backend=fallback promised=131072 served=8192"}}))
    reconcile(dg(kube), kube, now=clock)
    assert cond(kube, "FallbackReady")["reason"] == "ContextTooShort"
    assert cond(kube, "ContextVerified")["status"] == "False"


def test_status_kuberay_missing(kube, clock):
    kube.kuberay = False
    with pytest.raises(KubeRayMissingError):
        reconcile(dg(kube), kube, now=clock)
    assert [c[0] for c in kube.writes()] == ["patch_status"]  # nothing applied, status written
    assert cond(kube, "Degraded")["reason"] == "KubeRayMissing" and cond(kube, "Degraded")["status"] == "True"
    assert cond(kube, "Ready")["reason"] == "KubeRayMissing"
    assert status(kube)["observedGeneration"] == 1


def test_status_upgrade_with_new_cluster(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    kube.set_rayservice_status(NS, NAME, rs_status())
    reconcile(dg(kube), kube, now=clock)
    kube.set_rayservice_status(NS, NAME, rs_status(upgrade=True, pending={"rayClusterName": "gemma-fghij"}))
    reconcile(dg(kube), kube, now=clock)
    up = cond(kube, "UpgradeInProgress")
    assert up["status"] == "True" and up["reason"] == "NewCluster" and "gemma-fghij" in up["message"]
    assert cond(kube, "Ready")["status"] == "True"  # the active cluster keeps serving
    assert status(kube)["servedContextLength"] == 131072


def test_invalid_spec_is_reported_and_permanent(kube, clock):
    with pytest.raises(InvalidSpecError, match="quantization 'nvfp4'"):
        reconcile(dg(kube, dict(SPEC, quantization="nvfp4")), kube, now=clock)
    assert kube.rayservices == {}
    assert cond(kube, "Ready")["reason"] == "InvalidSpec" and "nvfp4" in cond(kube, "Ready")["message"]


def test_transition_time_changes_only_with_status(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    before = {c["type"]: c["lastTransitionTime"] for c in status(kube)["conditions"]}
    kube.set_rayservice_status(NS, NAME, rs_status())
    reconcile(dg(kube), kube, now=clock)
    after = {c["type"]: c["lastTransitionTime"] for c in status(kube)["conditions"]}
    assert after["Ready"] != before["Ready"]  # False -> True
    assert after["Degraded"] == before["Degraded"]  # False -> False
    assert all(c["observedGeneration"] == 1 for c in status(kube)["conditions"])


# --- the event path: RayService status -> DiffusionGemma status ---------------------------------------


def test_rayservice_event_refreshes_status_without_touching_observed_generation(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    rs = kube.set_rayservice_status(NS, NAME, rs_status())
    kube.calls.clear()
    assert refresh_status(rs, kube, now=clock) is True
    assert cond(kube, "Ready")["status"] == "True" and status(kube)["observedGeneration"] == 1
    kube.calls.clear()
    assert refresh_status(rs, kube, now=clock) is False  # unchanged: no write
    assert kube.writes() == []


def test_rayservice_event_waits_for_pending_spec_change(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    rs = kube.set_rayservice_status(NS, NAME, rs_status())
    kube.diffusiongemmas[(NS, NAME)]["metadata"]["generation"] = 2  # edited, not reconciled yet
    assert refresh_status(rs, kube, now=clock) is False


def test_rayservice_event_ignores_objects_it_does_not_own(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    rs = kube.set_rayservice_status(NS, NAME, rs_status())
    rs["metadata"]["ownerReferences"] = [{"uid": "someone-else", "controller": True}]
    assert refresh_status(rs, kube, now=clock) is False


# --- kopf handlers and error mapping --------------------------------------------------------------------


def test_handlers_are_registered():
    registry = kopf.get_default_registry()
    changing = [h.id for h in registry._changing.get_all_handlers()]
    assert any("create_diffusiongemma" in i for i in changing)
    assert any("update_diffusiongemma" in i for i in changing)
    assert any("delete_diffusiongemma" in i for i in changing)
    assert any("rayservice_event" in h.id for h in registry._watching.get_all_handlers())
    delete = next(h for h in registry._changing.get_all_handlers() if "delete" in h.id)
    assert delete.requires_finalizer is False  # owner references clean up; no finalizer


@pytest.mark.parametrize("error, kopf_error, delay", [
    (InvalidSpecError("bad"), kopf.PermanentError, None),
    (ApiRejectedError("422"), kopf.PermanentError, None),
    (KubeRayMissingError("no CRD"), kopf.TemporaryError, handlers.KUBERAY_RETRY_S),
    (TransientApiError("503", delay=7), kopf.TemporaryError, 7),
])
def test_errors_become_retry_intents(error, kopf_error, delay):
    def step():
        raise error

    with pytest.raises(kopf_error) as info:
        handlers.run_step(step)
    if delay is not None:
        assert info.value.delay == delay


def test_create_handler_runs_reconcile_with_the_injected_client(kube):
    body = dg(kube)
    handlers.create_diffusiongemma(body=body, memo={"kube": kube}, logger=_Logger())
    assert (NS, NAME) in kube.rayservices
    kube.fail_next = TransientApiError("API server error 503", delay=5)
    with pytest.raises(kopf.TemporaryError):
        handlers.update_diffusiongemma(body=dg(kube, dict(SPEC, maxBatchPerReplica=2), generation=2),
                                       memo={"kube": kube}, logger=_Logger())


def test_handler_settings_keep_status_ours():
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)


@pytest.mark.parametrize("code, expected, retry", [
    (409, TransientApiError, True), (429, TransientApiError, True), (503, TransientApiError, True),
    (403, TransientApiError, True), (422, ApiRejectedError, False), (400, ApiRejectedError, False),
])
def test_api_errors_are_typed(code, expected, retry):
    from kubernetes.client.exceptions import ApiException

    err = map_api_error("patch RayService ml/gemma", ApiException(status=code, reason="x"))
    assert isinstance(err, expected) and "ml/gemma" in str(err)
    assert err.recoverable is retry


def test_render_matches_what_reconcile_applies(kube, clock):
    from dgserve.operator.render import render

    body = dg(kube)
    reconcile(body, kube, now=clock)
    (rendered,) = render(body)
    stored = kube.rayservices[(NS, NAME)]
    assert stored["spec"] == rendered["spec"]
    assert yaml.safe_load(stored["spec"]["serveConfigV2"])["applications"][0]["args"]["promised_context_length"] \
        == 131072


class _Logger:
    def info(self, *a, **k):
        pass

    def warning(self, *a, **k):
        pass


# --- the contract with serving's start-up context check -----------------------------------------------


@pytest.mark.parametrize("backend", ["diffusion", "fallback"])
def test_serving_context_refusal_is_understood(backend):
    """The message serving raises (and Serve/KubeRay pass on) is parsed into the shortfall."""
    from dgserve.engine.errors import ContextVerificationError
    from dgserve.operator.status import parse_context_shortfall
    from dgserve.serving.diffusion import check_served_context

    with pytest.raises(ContextVerificationError) as info:
        check_served_context(backend, "google/diffusiongemma-26B-A4B-it", 8192, 262144)
    # as it reaches the deployment status: inside a traceback from the replica's constructor
    message = (f"The deployment failed to start 3 times in a row.\nTraceback ...\n"
               f"{type(info.value).__name__}: {info.value}")
    shortfall = parse_context_shortfall(message)
    assert shortfall is not None
    assert (shortfall.backend, shortfall.promised, shortfall.served) == (backend, 262144, 8192)
    assert parse_context_shortfall("replica crashed: CUDA out of memory") is None


def test_status_from_serving_refusal(kube, clock):
    from dgserve.serving.diffusion import check_served_context

    reconcile(dg(kube), kube, now=clock)
    try:
        check_served_context("fallback", "HuggingFaceTB/SmolLM2-135M-Instruct", 8192, 131072)
    except Exception as e:  # noqa: BLE001 - the message is what matters
        message = str(e)
    kube.set_rayservice_status(NS, NAME, rs_status(app="DEPLOY_FAILED", ready="False", deployments={
        names.DIFFUSION_DEPLOYMENT: {"status": "HEALTHY"},
        names.FALLBACK_DEPLOYMENT: {"status": "UNHEALTHY", "message": message}}))
    reconcile(dg(kube), kube, now=clock)
    assert cond(kube, "FallbackReady")["reason"] == "ContextTooShort"
    assert cond(kube, "ContextVerified")["message"] == "backend fallback serves 8192 tokens, 131072 promised"
    assert status(kube)["servedContextLength"] == 8192


def test_rayservice_deleted_behind_our_back_is_recreated(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    gone = kube.rayservices.pop((NS, NAME))
    handlers.rayservice_event(event={"type": "DELETED"}, body=gone, memo={"kube": kube}, logger=_Logger())
    assert (NS, NAME) in kube.rayservices


def test_rayservice_deleted_with_its_owner_stays_deleted(kube, clock):
    reconcile(dg(kube), kube, now=clock)
    gone = kube.rayservices.pop((NS, NAME))
    kube.diffusiongemmas[(NS, NAME)]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    handlers.rayservice_event(event={"type": "DELETED"}, body=gone, memo={"kube": kube}, logger=_Logger())
    del kube.diffusiongemmas[(NS, NAME)]
    handlers.rayservice_event(event={"type": "DELETED"}, body=gone, memo={"kube": kube}, logger=_Logger())
    assert (NS, NAME) not in kube.rayservices
