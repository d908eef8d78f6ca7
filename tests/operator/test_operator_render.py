"""Pure builders: DiffusionGemma spec -> RayService (with the gRPC Service inside) and the
serving AppConfig. Every rendered RayService is checked against KubeRay's v1.7 CRD schema
(../shared/crds/kuberay/), and its Serve config against the serving AppConfig and Ray's own
ServeDeploySchema."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import yaml

from dgserve.operator import names
from dgserve.operator.errors import InvalidSpecError
from dgserve.operator.render import (
    DIFFUSION_RAY_RESOURCE,
    FALLBACK_RAY_RESOURCE,
    Owner,
    build_app_config,
    build_rayservice,
    build_serve_config,
    parse_spec,
    render,
    to_yaml,
)
from dgserve.serving.config import IMPORT_PATH, AppConfig
from operator_testlib import REPO_ROOT, prune, rayservice_schema, strict, validate

OWNER = Owner("gemma", "ml", "uid-1")
HF = {"huggingFace": {"repo": "google/diffusiongemma-26B-A4B-it", "revision": "abc123",
                      "tokenSecret": {"name": "hf", "key": "token"}}}
PVC = {"pvc": {"claimName": "models", "path": "dg/26b"}}
EXT = {"url": "http://gemma4:8000/v1", "model": "gemma-4", "apiKeySecret": {"name": "k", "key": "api-key"}}


def spec_of(**over):
    raw = {"model": copy.deepcopy(HF), "security": {"allowPlaintext": True}}
    raw.update(over)
    return parse_spec(raw)


def groups(rs):
    return {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def serve_args(rs):
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    return app["args"]


def container(group):
    """The Ray container (the gRPC front sidecar aside)."""
    (c,) = [c for c in group["template"]["spec"]["containers"] if c["name"] != names.FRONT_CONTAINER]
    return c


def check_rayservice(rs):
    """Valid for KubeRay's CRD, nothing pruned (no misspelt field), args valid for AppConfig."""
    schema = rayservice_schema()
    validate(rs, strict(schema))
    assert prune(rs, schema) == rs
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == IMPORT_PATH
    AppConfig.model_validate(app["args"])


# --- tensor parallelism: workers, GPUs, packing ---------------------------------------------------

TP_TABLE = [  # tp, gpusPerWorker, min, max -> workers min, max
    (1, 1, 1, 1, 1, 1),
    (2, 2, 1, 1, 1, 1),
    (4, 8, 1, 4, 1, 2),
    (8, 8, 2, 2, 2, 2),
    (1, 8, 3, 10, 1, 2),
    (2, 4, 3, 3, 2, 2),
]


@pytest.mark.parametrize("tp, gpus, rmin, rmax, wmin, wmax", TP_TABLE)
def test_tensor_parallel_packing(tp, gpus, rmin, rmax, wmin, wmax):
    spec = spec_of(tensorParallelSize=tp, resources={"gpusPerWorker": gpus}, replicas={"min": rmin, "max": rmax})
    rs = build_rayservice(spec, OWNER)
    check_rayservice(rs)
    g = groups(rs)[names.DIFFUSION_GROUP]
    assert (g["minReplicas"], g["maxReplicas"], g["replicas"]) == (wmin, wmax, wmin)
    assert g["rayStartParams"]["num-gpus"] == str(gpus)
    assert container(g)["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert g["resources"] == {DIFFUSION_RAY_RESOURCE: str(gpus // tp)}  # replicas per worker
    assert wmax * (gpus // tp) >= rmax and math.ceil(rmin / (gpus // tp)) == wmin
    args = serve_args(rs)["diffusion"]
    assert args["engine"]["tensor_parallel_size"] == tp
    assert args["actor_options"]["num_gpus"] == 1.0  # per rank: the replica reserves tp GPU bundles
    assert args["actor_options"]["resources"] == {DIFFUSION_RAY_RESOURCE: 1.0}


def test_tensor_parallel_larger_than_worker_is_refused():
    with pytest.raises(InvalidSpecError, match="tensorParallelSize 8 exceeds resources.gpusPerWorker 4"):
        spec_of(tensorParallelSize=8, resources={"gpusPerWorker": 4})


# --- replicas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas, autoscaling", [
    ({"min": 2, "max": 2}, None),
    ({"min": 1, "max": 3}, {"min_replicas": 1, "max_replicas": 3}),
    ({"min": 2, "max": 8, "targetOngoingRequests": 3}, {"min_replicas": 2, "max_replicas": 8,
                                                         "target_ongoing_requests": 3.0}),
])
def test_replicas_fixed_or_autoscaled(replicas, autoscaling):
    rs = build_rayservice(spec_of(replicas=replicas, maxBatchPerReplica=4), OWNER)
    check_rayservice(rs)
    args = serve_args(rs)["diffusion"]
    assert args["num_replicas"] == replicas["min"]
    if autoscaling is None:
        assert args["autoscaling"] is None
    else:
        assert {k: args["autoscaling"][k] for k in autoscaling} == autoscaling
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is (autoscaling is not None)


# --- quantization and settings the serving side cannot carry yet --------------------------------------


def test_bf16_maps_to_bfloat16():
    assert build_app_config(spec_of(quantization="bf16")).diffusion.engine.dtype == "bfloat16"


@pytest.mark.parametrize("quantization", ["fp8", "nvfp4"])
def test_unsupported_quantization_is_refused_by_name(quantization):
    with pytest.raises(InvalidSpecError, match=f"quantization '{quantization}'"):
        build_app_config(spec_of(quantization=quantization))


@pytest.mark.parametrize("field, attr, value", [("maxDenoisingSteps", "max_denoising_steps", 16),
                                                ("entropyBound", "entropy_bound", 0.2),
                                                ("confidenceThreshold", "confidence_threshold", 0.0)])
def test_sampler_defaults_reach_the_engine(field, attr, value):
    engine = build_app_config(spec_of(diffusion={field: value})).diffusion.engine
    assert getattr(engine, attr) == value
    unset = build_app_config(spec_of()).diffusion.engine
    assert getattr(unset, attr) is None  # the checkpoint's generation_config.json applies


# --- model sources -------------------------------------------------------------------------------


def test_hugging_face_model_is_downloaded_by_an_init_container():
    rs = build_rayservice(spec_of(), OWNER)
    pod = groups(rs)[names.DIFFUSION_GROUP]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["hf", "download", "google/diffusiongemma-26B-A4B-it"]
    assert "abc123" in init["command"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in init["env"]
    assert "HF_TOKEN" not in str(container(groups(rs)[names.DIFFUSION_GROUP]).get("env"))  # download only
    assert serve_args(rs)["diffusion"]["engine"]["model"] == f"{names.MODELS_DIR}/google/diffusiongemma-26B-A4B-it"


def test_pvc_model_is_mounted_read_only():
    rs = build_rayservice(spec_of(model=copy.deepcopy(PVC)), OWNER)
    check_rayservice(rs)
    pod = groups(rs)[names.DIFFUSION_GROUP]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    mount = next(m for m in container(groups(rs)[names.DIFFUSION_GROUP])["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True
    assert serve_args(rs)["diffusion"]["engine"]["model"] == f"{names.MODELS_DIR}/dg/26b"


# --- fallback variants ----------------------------------------------------------------------------------

FALLBACKS = {
    "disabled": ({"type": "Disabled"}, {"enabled": False}, None),
    "external": ({"type": "External", "contextLength": 262144, "external": EXT},
                 {"enabled": True, "kind": "openai", "url": EXT["url"], "model_name": "gemma-4",
                  "api_key_env": names.FALLBACK_API_KEY_ENV, "context_length": 262144}, None),
    "external-no-key": ({"type": "External", "contextLength": 300000, "external": {"url": "https://x/v1",
                                                                                    "model": "m"}},
                        {"kind": "openai", "api_key_env": None}, None),
    "bundled": ({"type": "InCluster", "contextLength": 262144},
                {"kind": "smollm2", "device": "cpu", "dtype": "float32", "context_length": 262144}, 0),
    "hf-gpu": ({"type": "InCluster", "contextLength": 262144, "replicas": {"min": 1, "max": 3},
                "inCluster": {"gpus": 1, "model": {"huggingFace": {"repo": "google/gemma-4-26b-it"}}}},
               {"kind": "local", "device": "cuda", "model_path": f"{names.FALLBACK_MODELS_DIR}/google/gemma-4-26b-it",
                "autoscaling": {"min_replicas": 1, "max_replicas": 3}}, 1),
    "pvc": ({"type": "InCluster", "contextLength": 262144, "inCluster": {"model": {"pvc": {"claimName": "ar"}}}},
            {"kind": "local", "model_path": names.FALLBACK_MODELS_DIR}, 0),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_fallback_variants(name):
    fallback, expected_args, fallback_gpus = FALLBACKS[name]
    spec = spec_of(fallback=fallback, nodeSelector={"gpu": "h100"})
    rs = build_rayservice(spec, OWNER)
    check_rayservice(rs)
    args = serve_args(rs)["fallback"]
    for key, value in expected_args.items():
        if isinstance(value, dict):
            assert {k: args[key][k] for k in value} == value
        else:
            assert args[key] == value, key
    g = groups(rs)
    diffusion_env = container(g[names.DIFFUSION_GROUP]).get("env", [])
    if fallback_gpus is None:  # no in-cluster fallback: no worker group for it
        assert set(g) == {names.DIFFUSION_GROUP}
    else:
        fb = g[names.FALLBACK_GROUP]
        assert fb["resources"] == {FALLBACK_RAY_RESOURCE: "1"}
        assert args["actor_options"]["resources"] == {FALLBACK_RAY_RESOURCE: 1.0}
        limits = container(fb)["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (str(fallback_gpus) if fallback_gpus else None)
        # GPU fallback pods follow the GPU node selector; CPU ones may run anywhere
        assert ("nodeSelector" in fb["template"]["spec"]) is bool(fallback_gpus)
        assert (fb["minReplicas"], fb["maxReplicas"]) == (spec.fallback.replicas.min, spec.fallback.replicas.max)
    key_env = [e for e in diffusion_env if e["name"] == names.FALLBACK_API_KEY_ENV]
    assert bool(key_env) is (name == "external")


# --- the Service, metadata and the whole object ------------------------------------------------------


def test_grpc_service_rides_in_the_rayservice():
    rs = build_rayservice(spec_of(grpcPort=9443), OWNER)
    svc = rs["spec"]["serveService"]
    assert svc["metadata"]["name"] == "gemma" and "selector" not in svc["spec"]  # KubeRay sets the selector
    assert svc["spec"]["ports"] == [{"name": "grpc", "port": 9443, "targetPort": 9443, "protocol": "TCP",
                                     "appProtocol": "grpc"}]
    # the gRPC front listens on the Service's port; Serve's proxy behind it on an internal one
    assert yaml.safe_load(rs["spec"]["serveConfigV2"])["grpc_options"]["port"] == names.PROXY_PORT


def test_owner_reference_labels_and_hash():
    rs = build_rayservice(spec_of(), OWNER)
    assert rs["metadata"]["ownerReferences"] == [{
        "apiVersion": "dgserve.io/v1alpha1", "kind": "DiffusionGemma", "name": "gemma", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True}]
    assert rs["metadata"]["labels"][names.LABEL_OWNER] == "gemma"
    same = build_rayservice(spec_of(), OWNER)
    other = build_rayservice(spec_of(maxBatchPerReplica=8), OWNER)
    h = names.ANNOTATION_SPEC_HASH
    assert same["metadata"]["annotations"][h] == rs["metadata"]["annotations"][h]
    assert other["metadata"]["annotations"][h] != rs["metadata"]["annotations"][h]


def test_head_runs_no_replica_and_workers_carry_tolerations():
    tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    rs = build_rayservice(spec_of(tolerations=tol, nodeSelector={"pool": "gpu"}), OWNER)
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nodeSelector" not in head["template"]["spec"]
    pod = groups(rs)[names.DIFFUSION_GROUP]["template"]["spec"]
    assert pod["tolerations"] == tol and pod["nodeSelector"] == {"pool": "gpu"}


@pytest.mark.parametrize("fallback", ["default", "hf-gpu"])
def test_every_ray_node_exports_metrics_on_the_named_port(fallback):
    """Prometheus (KubeRay's PodMonitor recipe) scrapes the container port named "metrics": every
    Ray container declares it and every Ray node's metrics agent listens there."""
    rs = build_rayservice(spec_of(fallback=FALLBACKS[fallback][0]) if fallback in FALLBACKS else spec_of(), OWNER)
    cluster = rs["spec"]["rayClusterConfig"]
    ray_groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert len(ray_groups) == (3 if fallback == "hf-gpu" else 2)  # head, diffusion (+ fallback GPUs)
    for g in ray_groups:
        port = int(g["rayStartParams"]["metrics-export-port"])
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container(g)["ports"]
    check_rayservice(rs)


def test_serve_config_is_valid_for_ray_serve():
    from ray.serve.schema import ServeDeploySchema

    config = build_serve_config(spec_of(fallback={"type": "InCluster", "contextLength": 262144}))
    ServeDeploySchema.model_validate(config)
    assert config["applications"][0]["args"] == build_app_config(
        spec_of(fallback={"type": "InCluster", "contextLength": 262144})).model_dump(mode="json")


def test_kuberay_schema_check_can_fail():
    rs = build_rayservice(spec_of(), OWNER)
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 1  # misspelt
    with pytest.raises(Exception):
        validate(rs, strict(rayservice_schema()))
    assert prune(rs, rayservice_schema()) != rs


# --- the example and the CLI ----------------------------------------------------------------------------


def test_example_renders_for_one_h100():
    (doc,) = yaml.safe_load_all((REPO_ROOT / "deploy/diffusiongemma.yaml").read_text())
    doc["metadata"]["namespace"] = "default"
    (rs,) = render(doc)
    check_rayservice(rs)
    g = groups(rs)
    assert set(g) == {names.DIFFUSION_GROUP}
    assert container(g[names.DIFFUSION_GROUP])["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert rs["spec"]["upgradeStrategy"] == {"type": "None"}  # no second GPU for a blue/green switch
    assert serve_args(rs)["promised_context_length"] == 262144


def test_dgserve_render_cli(capsys, monkeypatch):
    import io

    from dgserve.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO((REPO_ROOT / "deploy/diffusiongemma.yaml").read_text()))
    assert main(["render", "-f", "-", "-n", "prod"]) == 0
    out = capsys.readouterr().out
    (rs,) = list(yaml.safe_load_all(out))
    assert rs["kind"] == "RayService" and rs["metadata"]["namespace"] == "prod"
    assert "ownerReferences" not in rs["metadata"]  # no uid without a cluster
    assert out == to_yaml([rs])


def test_dgserve_render_cli_refuses_a_bad_spec(tmp_path, capsys):
    from dgserve.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "g"},
                                   "spec": {"model": {"pvc": {"claimName": "m"}}, "quantization": "fp8",
                                            "security": {"allowPlaintext": True}}}))
    assert main(["render", "-f", str(bad)]) == 2
    assert "quantization 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_serving_builder_accepts_rendered_args_and_packs_tp_gpus(tp):
    """The rendered args go through serving's own entrypoint; a replica reserves tp GPU bundles,
    STRICT_PACK (one node), the first one carrying the custom resource that pins it to our workers."""
    from dgserve.serving.app import app_builder, diffusion_options

    rs = build_rayservice(spec_of(tensorParallelSize=tp, resources={"gpusPerWorker": 8},
                                  fallback={"type": "InCluster", "contextLength": 262144}), OWNER)
    args = serve_args(rs)
    app_builder(args)  # binds Router, DiffusionReplica, AutoregressiveFallback without a Ray cluster
    opts = diffusion_options(AppConfig.model_validate(args))
    assert opts["max_ongoing_requests"] == 4
    if tp == 1:
        assert opts["ray_actor_options"]["num_gpus"] == 1.0
        assert opts["ray_actor_options"]["resources"] == {DIFFUSION_RAY_RESOURCE: 1.0}
    else:
        bundles = opts["placement_group_bundles"]
        assert len(bundles) == tp and all(b["GPU"] == 1.0 for b in bundles)
        assert bundles[0][DIFFUSION_RAY_RESOURCE] == 1.0
        assert opts["placement_group_strategy"] == "STRICT_PACK"


def test_operator_run_without_kubeconfig_fails_fast(tmp_path, monkeypatch, capsys):
    from dgserve.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["operator", "run", "--standalone"]) == 2
    assert "no Kubernetes configuration" in capsys.readouterr().err


def test_operator_crd_cli_prints_the_generated_crd(capsys):
    from dgserve.cli import main
    from dgserve.operator.crd import build_crd

    assert main(["operator", "crd"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == build_crd()
