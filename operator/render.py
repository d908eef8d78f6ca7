"""Pure builders: a validated :class:`DiffusionGemmaSpec` -> the objects the operator applies.

Nothing here talks to a cluster. ``dgserve render`` prints the same objects the operator applies.

* :func:`build_app_config` maps the spec onto the serving side's :class:`AppConfig` (the one
  model both sides validate); its ``model_dump`` becomes the Serve application's ``args``.
* :func:`build_serve_config` renders the whole Serve config (KubeRay's ``serveConfigV2``).
* :func:`build_service` renders the gRPC Service; it travels inside the RayService as
  ``spec.serveService`` so that KubeRay points its selector at whichever Ray cluster is active
  (a Service we applied ourselves could not follow KubeRay's zero-downtime cluster switch).
* :func:`build_rayservice` renders the RayService: a CPU head that runs no replica, a GPU worker
  group sized so that each replica packs ``tensorParallelSize`` GPUs on one worker, and for an
  in-cluster fallback its own worker group.
* Every Ray pod carries the gRPC front (``dgserve front``: TLS, tokens, per-client cap) as a
  sidecar on the Service's port, Serve's gRPC proxy moves to an internal port behind it
  (``docs/security.md``), and every container runs as a non-root user with a read-only root
  filesystem, no privilege escalation and no capabilities (``/tmp`` is an emptyDir).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import yaml

from dgserve.engine.config import EngineConfig
from dgserve.serving.config import (
    ActorOptions,
    AppConfig,
    AuthSettings,
    AutoscalingSettings,
    DiffusionBackendConfig,
    FallbackConfig,
    LimitSettings,
    RouterConfig,
    SecurityConfig,
    TelemetryConfig,
    TLSSettings,
)

from . import names
from .errors import InvalidSpecError
from .spec import (
    NAME_RULE,
    DiffusionGemmaSpec,
    FallbackModelSource,
    HuggingFaceSource,
    InClusterFallback,
    ModelSource,
    Replicas,
    Security,
)

# Custom Ray resources that pin each replica kind to its own worker group (and cap the
# diffusion replicas per worker at gpusPerWorker / tensorParallelSize).
DIFFUSION_RAY_RESOURCE = "dgserve_diffusion"
FALLBACK_RAY_RESOURCE = "dgserve_fallback"
APP_NAME = "dgserve"
DTYPES = {"bf16": "bfloat16"}
DOWNLOAD_RESOURCES = {"cpu": "1", "memory": "2Gi"}


@dataclass(frozen=True)
class Owner:
    """The DiffusionGemma being rendered (what the objects are named after and owned by)."""

    name: str
    namespace: str
    uid: str = ""

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Owner:
        meta = body.get("metadata") or {}
        return cls(name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid") or "")

    def owner_reference(self) -> dict[str, Any]:
        return {"apiVersion": names.API_VERSION, "kind": names.KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def labels(owner: Owner, component: str | None = None) -> dict[str, str]:
    out = {names.LABEL_NAME: "diffusiongemma", names.LABEL_INSTANCE: owner.name,
           names.LABEL_MANAGED_BY: names.MANAGER, names.LABEL_OWNER: owner.name}
    if component:
        out[names.LABEL_COMPONENT] = component
    return out


# --- the Serve application ---------------------------------------------------------------------


def unsupported_settings(spec: DiffusionGemmaSpec) -> list[str]:
    """Spec settings the serving AppConfig cannot carry yet: refused, never dropped silently."""
    out = []
    if spec.quantization not in DTYPES:
        out.append(f"quantization {spec.quantization!r} (the engine serves {sorted(DTYPES)} only)")
    return out


def model_dir(source: ModelSource | FallbackModelSource, mount: str) -> str:
    """Where the model directory appears inside the pods."""
    if source.hugging_face is not None:
        return f"{mount}/{source.hugging_face.repo}"
    if source.pvc is not None:
        return f"{mount}/{source.pvc.path}".rstrip("/") if source.pvc.path else mount
    raise ValueError("model source has neither huggingFace nor pvc")


def _autoscaling(replicas: Replicas) -> AutoscalingSettings | None:
    if replicas.min == replicas.max:
        return None
    extra = {} if replicas.target_ongoing_requests is None else {
        "target_ongoing_requests": replicas.target_ongoing_requests}
    return AutoscalingSettings(min_replicas=replicas.min, max_replicas=replicas.max, **extra)


def _fallback_config(spec: DiffusionGemmaSpec) -> FallbackConfig:
    fb = spec.fallback
    common: dict[str, Any] = {"num_replicas": fb.replicas.min, "autoscaling": _autoscaling(fb.replicas),
                              "context_length": fb.context_length, "max_batch": fb.max_batch}
    if fb.type == "Disabled":
        return FallbackConfig(enabled=False)
    if fb.type == "External":
        ext = fb.external
        assert ext is not None  # Fallback's rule
        return FallbackConfig(kind="openai", url=ext.url, model_name=ext.model,
                              api_key_env=names.FALLBACK_API_KEY_ENV if ext.api_key_secret else None,
                              request_timeout_s=ext.request_timeout_seconds, **common)
    inc = fb.in_cluster or InClusterFallback()
    gpu = inc.gpus > 0
    actor = ActorOptions(num_cpus=1.0, num_gpus=float(inc.gpus), resources={FALLBACK_RAY_RESOURCE: 1.0})
    device, dtype = ("cuda", "bfloat16") if gpu else ("cpu", "float32")
    if inc.model.hugging_face is None and inc.model.pvc is None:
        return FallbackConfig(kind="smollm2", device=device, dtype=dtype, actor_options=actor, **common)
    return FallbackConfig(kind="local", model_path=model_dir(inc.model, names.FALLBACK_MODELS_DIR),
                          model_name=inc.model.hugging_face.repo if inc.model.hugging_face else None,
                          device=device, dtype=dtype, actor_options=actor, **common)


def proxy_port(spec: DiffusionGemmaSpec) -> int:
    """The internal port of Serve's gRPC proxy (the front listens on ``grpcPort``)."""
    return names.PROXY_PORT if spec.grpc_port != names.PROXY_PORT else names.PROXY_PORT_ALT


def _security(spec: DiffusionGemmaSpec) -> Security:
    if spec.security is None:  # DiffusionGemmaSpec's rule refuses this first
        raise InvalidSpecError("security: set security.tls.secretName (TLS) or security.allowPlaintext: true")
    return spec.security


def build_security_config(spec: DiffusionGemmaSpec) -> SecurityConfig:
    """The app's ``security`` section: the files the pods mount from the CR's Secrets."""
    sec = _security(spec)
    tls = None
    if sec.tls is not None:
        mtls = sec.tls.client_auth != "None"
        tls = TLSSettings(cert_file=f"{names.TLS_DIR}/tls.crt", key_file=f"{names.TLS_DIR}/tls.key",
                          client_ca_file=f"{names.CLIENT_CA_DIR}/ca.crt" if mtls else None,
                          require_client_cert=sec.tls.client_auth == "Require")
    lim = sec.limits
    return SecurityConfig(
        tls=tls, allow_plaintext=sec.allow_plaintext,
        auth=AuthSettings(token_file=f"{names.AUTH_DIR}/{names.AUTH_TOKEN_FILE}") if sec.auth else None,
        limits=LimitSettings(max_message_bytes=lim.max_message_bytes, max_prompt_chars=lim.max_prompt_chars,
                             max_new_tokens=lim.max_new_tokens,
                             max_concurrent_per_client=lim.max_concurrent_per_client or None),
        proxy_port=proxy_port(spec))


def build_app_config(spec: DiffusionGemmaSpec) -> AppConfig:
    """The serving application's config for this spec (raises :class:`InvalidSpecError`)."""
    refused = unsupported_settings(spec)
    if refused:
        raise InvalidSpecError("not supported by this dgserve version: " + "; ".join(refused))
    hf: HuggingFaceSource | None = spec.model.hugging_face
    engine = EngineConfig(
        model=model_dir(spec.model, names.MODELS_DIR),
        model_name=hf.repo if hf else None,
        dtype=DTYPES[spec.quantization],
        device="auto",
        max_batch=spec.max_batch_per_replica,
        tensor_parallel_size=spec.tensor_parallel_size,
        # sampler defaults of every request (unset: the checkpoint's generation_config.json)
        max_denoising_steps=spec.diffusion.max_denoising_steps,
        entropy_bound=spec.diffusion.entropy_bound,
        confidence_threshold=spec.diffusion.confidence_threshold,
    )
    diffusion = DiffusionBackendConfig(
        engine=engine,
        num_replicas=spec.replicas.min,
        autoscaling=_autoscaling(spec.replicas),
        actor_options=ActorOptions(num_cpus=1.0, num_gpus=1.0, accelerator_type=spec.resources.accelerator_type,
                                   resources={DIFFUSION_RAY_RESOURCE: 1.0}),
    )
    try:
        return AppConfig(
            name=APP_NAME,
            promised_context_length=spec.context_length,
            diffusion=diffusion,
            fallback=_fallback_config(spec),
            router=RouterConfig(grpc_port=spec.grpc_port),
            telemetry=TelemetryConfig(otlp_endpoint=spec.telemetry.otlp_endpoint,
                                      sampling_ratio=spec.telemetry.sampling_ratio),
            security=build_security_config(spec),
        )
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise InvalidSpecError(f"spec does not map onto a valid serving AppConfig: {e}") from e


def build_serve_config(spec: DiffusionGemmaSpec) -> dict[str, Any]:
    """The Serve config document (KubeRay ``serveConfigV2``, as a dict)."""
    app = build_app_config(spec)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},  # KubeRay's readiness probes use Serve's HTTP proxy
        **app.serve_config(),
    }


# --- Kubernetes objects --------------------------------------------------------------------------


def build_service(spec: DiffusionGemmaSpec, owner: Owner) -> dict[str, Any]:
    """The gRPC Service (KubeRay sets its selector to the active cluster's serving pods)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": owner.name, "labels": labels(owner, "grpc")},
        "spec": {
            "type": "ClusterIP",
            "ports": [{"name": "grpc", "port": spec.grpc_port, "targetPort": spec.grpc_port, "protocol": "TCP",
                       "appProtocol": "grpc"}],
        },
    }


def _worker_counts(replicas: Replicas, per_worker: int) -> tuple[int, int]:
    return math.ceil(replicas.min / per_worker), math.ceil(replicas.max / per_worker)


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _model_volume(source: ModelSource | FallbackModelSource, volume: str) -> dict[str, Any]:
    if source.pvc is not None:
        return {"name": volume, "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True}}
    return {"name": volume, "emptyDir": {}}


CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
                      "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": names.RUN_AS_USER, "runAsGroup": names.RUN_AS_USER,
                "fsGroup": names.RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}
BASE_ENV = [{"name": "HOME", "value": names.TMP_DIR}, {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}]
TMP_VOLUME = {"name": "tmp", "emptyDir": {}}
TMP_MOUNT = {"name": "tmp", "mountPath": names.TMP_DIR}
SECRET_MODE = 0o440  # owner and group (fsGroup) may read
FRONT_RESOURCES = {"cpu": "500m", "memory": "1Gi"}
# Ray's metrics agent (ray_dgserve_* and Ray's own metrics) on every Ray node; KubeRay's Prometheus
# guide scrapes the container port named "metrics" with PodMonitors on ray.io/node-type.
METRICS_PORT = 8080
METRICS_START_PARAM = {"metrics-export-port": str(METRICS_PORT)}


def _security_volumes(spec: DiffusionGemmaSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                           list[dict[str, Any]]]:
    """(volumes, the front's mounts, the Ray container's mounts) of the CR's TLS and token Secrets."""
    sec = _security(spec)
    volumes: list[dict[str, Any]] = []
    front: list[dict[str, Any]] = []
    ray: list[dict[str, Any]] = []
    if sec.tls is not None:
        volumes.append({"name": "tls", "secret": {"secretName": sec.tls.secret_name, "defaultMode": SECRET_MODE,
                                                  "items": [{"key": "tls.crt", "path": "tls.crt"},
                                                            {"key": "tls.key", "path": "tls.key"}]}})
        front.append({"name": "tls", "mountPath": names.TLS_DIR, "readOnly": True})
        if sec.tls.client_auth != "None":
            volumes.append({"name": "client-ca", "secret": {
                "secretName": sec.tls.client_ca_secret_name or sec.tls.secret_name, "defaultMode": SECRET_MODE,
                "items": [{"key": "ca.crt", "path": "ca.crt"}]}})
            front.append({"name": "client-ca", "mountPath": names.CLIENT_CA_DIR, "readOnly": True})
    if sec.auth is not None:
        ref = sec.auth.token_secret
        volumes.append({"name": "auth-token", "secret": {"secretName": ref.name, "defaultMode": SECRET_MODE,
                                                         "items": [{"key": ref.key, "path": names.AUTH_TOKEN_FILE}]}})
        mount = {"name": "auth-token", "mountPath": names.AUTH_DIR, "readOnly": True}
        front.append(mount)
        ray.append(dict(mount))  # the router checks the token again behind the front
    return volumes, front, ray


def front_args(spec: DiffusionGemmaSpec) -> list[str]:
    """``dgserve front`` arguments for this spec (the same settings as the app's ``security`` section)."""
    cfg = build_security_config(spec)
    args = [f"--port={spec.grpc_port}", "--host=[::]", f"--upstream=127.0.0.1:{cfg.proxy_port}",
            f"--max-message-bytes={cfg.limits.max_message_bytes}",
            f"--max-concurrent-per-client={cfg.limits.max_concurrent_per_client or 0}"]
    if cfg.tls is not None:
        args += [f"--tls-cert={cfg.tls.cert_file}", f"--tls-key={cfg.tls.key_file}"]
        if cfg.tls.client_ca_file:
            args.append(f"--tls-client-ca={cfg.tls.client_ca_file}")
            if not cfg.tls.require_client_cert:
                args.append("--tls-client-cert-optional")
    else:
        args.append("--allow-plaintext")
    if cfg.auth is not None:
        args.append(f"--token-file={cfg.auth.token_file}")
    return args


def _front_container(spec: DiffusionGemmaSpec, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """The gRPC front: the Service's port ends here, Serve's proxy is behind it on loopback. kubelet's gRPC
    probes cannot speak TLS, so the probes check the port (Serve's own readiness gates the Service)."""
    probe = {"tcpSocket": {"port": "grpc"}, "periodSeconds": 10, "timeoutSeconds": 3}
    return {
        "name": names.FRONT_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dgserve", "front"],
        "args": front_args(spec),
        "env": [dict(e) for e in BASE_ENV],
        "ports": [_grpc_port(spec)],
        "resources": {"requests": dict(FRONT_RESOURCES), "limits": dict(FRONT_RESOURCES)},
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [dict(TMP_MOUNT), *mounts],
        "readinessProbe": copy.deepcopy(probe),
        "livenessProbe": {**copy.deepcopy(probe), "initialDelaySeconds": 30, "failureThreshold": 6},
    }


def _download_container(spec: DiffusionGemmaSpec, hf: HuggingFaceSource, volume: str, mount: str) -> dict[str, Any]:
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": f"{mount}/.hf-home"},
                                 {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}, *[dict(e) for e in BASE_ENV]]
    if hf.token_secret is not None:
        env.append(_secret_env("HF_TOKEN", hf.token_secret))
    return {
        "name": f"download-{volume}",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["hf", "download", hf.repo, "--revision", hf.revision, "--local-dir", f"{mount}/{hf.repo}"],
        "env": env,
        "resources": {"requests": dict(DOWNLOAD_RESOURCES), "limits": dict(DOWNLOAD_RESOURCES)},
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [{"name": volume, "mountPath": mount}, dict(TMP_MOUNT)],
    }


def _container(name: str, spec: DiffusionGemmaSpec, resources: dict[str, str],
               mounts: list[dict[str, Any]], env: list[dict[str, Any]], ports: list[dict[str, Any]]) -> dict[str, Any]:
    """A Ray container: Serve's gRPC proxy listens on the internal port, Ray writes under /tmp only."""
    limit = build_security_config(spec).limits.max_message_bytes
    out: dict[str, Any] = {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "ports": [*ports, {"name": "grpc-proxy", "containerPort": proxy_port(spec), "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [*mounts, dict(TMP_MOUNT)],
        "env": [*env, *[dict(e) for e in BASE_ENV], {"name": "DGSERVE_STATE_DIR", "value": f"{names.TMP_DIR}/dgserve"},
                {"name": "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "value": str(limit)}],
    }
    return out


def _pod_spec(spec: DiffusionGemmaSpec, containers: list[dict[str, Any]], volumes: list[dict[str, Any]],
              init: list[dict[str, Any]], *, gpu_node: bool) -> dict[str, Any]:
    """The Ray container(s) plus the gRPC front, the Secrets they read, /tmp, and a non-root pod."""
    sec_volumes, front_mounts, ray_mounts = _security_volumes(spec)
    for c in containers:
        c["volumeMounts"] = [*c["volumeMounts"], *[dict(m) for m in ray_mounts]]
    out: dict[str, Any] = {"containers": [*containers, _front_container(spec, front_mounts)],
                           "securityContext": copy.deepcopy(POD_SECURITY),
                           "volumes": [*volumes, *sec_volumes, dict(TMP_VOLUME)]}
    if init:
        out["initContainers"] = init
    if gpu_node and spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if gpu_node and spec.tolerations:
        out["tolerations"] = [t.dump() for t in spec.tolerations]
    if spec.image_pull_secrets:
        out["imagePullSecrets"] = [s.dump() for s in spec.image_pull_secrets]
    return out


def _grpc_port(spec: DiffusionGemmaSpec) -> dict[str, Any]:
    return {"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"}


def _head_group(spec: DiffusionGemmaSpec, owner: Owner) -> dict[str, Any]:
    res = {"cpu": spec.resources.head.cpu, "memory": spec.resources.head.memory}
    ports = [{"name": n, "containerPort": p, "protocol": "TCP"}
             for n, p in (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000))]
    container = _container("ray-head", spec, res, [], [], ports)
    return {
        # num-cpus 0: the head runs Serve's controller and proxy, never a replica.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", **METRICS_START_PARAM},
        "template": {"metadata": {"labels": labels(owner, "ray-head")},
                     "spec": _pod_spec(spec, [container], [], [], gpu_node=False)},
    }


def _diffusion_group(spec: DiffusionGemmaSpec, owner: Owner) -> dict[str, Any]:
    gpus = spec.resources.gpus_per_worker
    per_worker = spec.replicas_per_worker
    w_min, w_max = _worker_counts(spec.replicas, per_worker)
    res = {"cpu": spec.resources.worker.cpu, "memory": spec.resources.worker.memory,
           spec.resources.gpu_resource_name: str(gpus)}
    volumes = [_model_volume(spec.model, "model"),
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}}]
    mounts = [{"name": "model", "mountPath": names.MODELS_DIR, "readOnly": spec.model.pvc is not None},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    init = ([_download_container(spec, spec.model.hugging_face, "model", names.MODELS_DIR)]
            if spec.model.hugging_face else [])
    env = []
    ext = spec.fallback.external if spec.fallback.type == "External" else None
    if ext is not None and ext.api_key_secret is not None:  # the proxy replicas run on these workers
        env.append(_secret_env(names.FALLBACK_API_KEY_ENV, ext.api_key_secret))
    container = _container("ray-worker", spec, res, mounts, env, [])
    return {
        "groupName": names.DIFFUSION_GROUP,
        "replicas": w_min,
        "minReplicas": w_min,
        "maxReplicas": w_max,
        "rayStartParams": {"num-gpus": str(gpus), **METRICS_START_PARAM},
        "resources": {DIFFUSION_RAY_RESOURCE: str(per_worker)},
        "template": {"metadata": {"labels": labels(owner, "diffusion-worker")},
                     "spec": _pod_spec(spec, [container], volumes, init, gpu_node=True)},
    }


def _fallback_group(spec: DiffusionGemmaSpec, owner: Owner) -> dict[str, Any] | None:
    if spec.fallback.type != "InCluster":
        return None
    inc = spec.fallback.in_cluster or InClusterFallback()
    res = {"cpu": inc.resources.cpu, "memory": inc.resources.memory}
    if inc.gpus:
        res[spec.resources.gpu_resource_name] = str(inc.gpus)
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                                   "sizeLimit": spec.resources.shared_memory}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    init: list[dict[str, Any]] = []
    if inc.model.hugging_face is not None or inc.model.pvc is not None:
        volumes.insert(0, _model_volume(inc.model, "fallback-model"))
        mounts.insert(0, {"name": "fallback-model", "mountPath": names.FALLBACK_MODELS_DIR,
                          "readOnly": inc.model.pvc is not None})
        if inc.model.hugging_face is not None:
            init.append(_download_container(spec, inc.model.hugging_face, "fallback-model",
                                            names.FALLBACK_MODELS_DIR))
    container = _container("ray-worker", spec, res, mounts, [], [])
    return {
        "groupName": names.FALLBACK_GROUP,
        "replicas": spec.fallback.replicas.min,
        "minReplicas": spec.fallback.replicas.min,
        "maxReplicas": spec.fallback.replicas.max,
        "rayStartParams": {"num-gpus": str(inc.gpus), **METRICS_START_PARAM},
        "resources": {FALLBACK_RAY_RESOURCE: "1"},  # one fallback replica per pod
        "template": {"metadata": {"labels": labels(owner, "fallback-worker")},
                     "spec": _pod_spec(spec, [container], volumes, init, gpu_node=inc.gpus > 0)},
    }


def rendered_hash(obj: dict[str, Any]) -> str:
    """Stable hash of what the operator owns in a rendered object (labels and spec)."""
    owned = {"labels": obj["metadata"].get("labels", {}), "spec": obj["spec"]}
    return hashlib.sha256(json.dumps(owned, sort_keys=True).encode()).hexdigest()[:16]


def build_rayservice(spec: DiffusionGemmaSpec, owner: Owner) -> dict[str, Any]:
    """The RayService for this spec, owned by the DiffusionGemma (garbage-collected with it)."""
    groups = [_diffusion_group(spec, owner)]
    fallback = _fallback_group(spec, owner)
    if fallback is not None:
        groups.append(fallback)
    autoscale = any(g["minReplicas"] != g["maxReplicas"] for g in groups)
    serve_config = yaml.safe_dump(build_serve_config(spec), sort_keys=False, width=1_000_000)
    obj: dict[str, Any] = {
        "apiVersion": names.RAY_API_VERSION,
        "kind": names.RAYSERVICE_KIND,
        "metadata": {
            "name": owner.name,
            "namespace": owner.namespace,
            "labels": labels(owner, "rayservice"),
        },
        "spec": {
            "upgradeStrategy": {"type": spec.upgrade_strategy},
            "serveConfigV2": serve_config,
            "serveService": build_service(spec, owner),
            "rayClusterConfig": {
                "rayVersion": names.RAY_VERSION_STRING,
                "enableInTreeAutoscaling": autoscale,
                "headGroupSpec": _head_group(spec, owner),
                "workerGroupSpecs": groups,
            },
        },
    }
    obj["metadata"]["annotations"] = {names.ANNOTATION_SPEC_HASH: rendered_hash(obj)}
    if owner.uid:  # known in the cluster; `dgserve render` without one leaves it to the operator
        obj["metadata"]["ownerReferences"] = [owner.owner_reference()]
    return obj


def parse_spec(raw: dict[str, Any] | None) -> DiffusionGemmaSpec:
    """Validate a raw ``.spec`` (raises :class:`InvalidSpecError` naming the field and the limit)."""
    try:
        return DiffusionGemmaSpec.model_validate(raw or {})
    except ValueError as e:
        raise InvalidSpecError(f"invalid DiffusionGemma spec: {e}") from e


def validate_name(name: str) -> None:
    if not NAME_RULE.check(name):
        raise InvalidSpecError(NAME_RULE.message + f" (got {name!r}, {len(name)} characters)")


class _BlockDumper(yaml.SafeDumper):
    """YAML dumper that writes multi-line strings (serveConfigV2) as readable literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Objects as a multi-document YAML stream (``kubectl apply -f -`` reads it)."""
    return yaml.dump_all(objects, Dumper=_BlockDumper, sort_keys=False, width=120)


def render(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything the operator applies for one DiffusionGemma object (what ``dgserve render`` prints)."""
    owner = Owner.from_body(body)
    validate_name(owner.name)
    spec = parse_spec(body.get("spec"))
    return [build_rayservice(spec, owner)]
