"""The ``DiffusionGemma`` resource as pydantic models: the one source of truth of its schema.

``dgserve.operator.crd`` turns these models into the CRD's structural ``openAPIV3Schema``;
the operator validates every spec with them before rendering anything. Cross-field rules are
declared once per model (:class:`Rule`): a CEL expression that the API server evaluates
(``x-kubernetes-validations``) and the same rule in Python for ``dgserve render`` and the
operator. ``tests/operator/test_cel.py`` checks that both agree on good and bad specs.

Field names are camelCase on the wire (Kubernetes convention), snake_case in Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

# Kubernetes resource.Quantity, as the API server's own regular expression spells it.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
RAY_RESERVED_PORTS = (6379, 8000, 8080, 8265, 10001, 52365)
MAX_NAME_LENGTH = 40  # KubeRay appends suffixes to cluster, service and pod names.
DEFAULT_IMAGE = "docker.io/dgserve/dgserve:0.1.0"


@dataclass(frozen=True)
class Rule:
    """One cross-field rule, enforced twice from one declaration.

    ``cel`` runs in the API server (``x-kubernetes-validations``, ``self`` is the object as JSON
    after defaulting); ``check`` runs in Python on the validated model; ``message_expression``
    (CEL) and ``message`` (Python, ``str.format`` over the model's attributes) name the
    offending values and the limit.
    """

    cel: str
    message: str
    message_expression: str
    check: Callable[[Any], bool]

    def to_k8s(self) -> dict[str, str]:
        """The ``x-kubernetes-validations`` entry; the static message drops the ``{m...}`` placeholders."""
        return {"rule": self.cel, "message": re.sub(r"\s*\{[^}]*\}", "", self.message),
                "messageExpression": self.message_expression}


class _Model(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields refused, rules enforced."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _rules(self) -> _Model:
        for rule in self.RULES:
            if not rule.check(self):
                raise ValueError(rule.message.format(m=self))
        return self

    def dump(self) -> dict[str, Any]:
        """The wire form (camelCase, no unset optionals)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SecretKeyRef(_Model):
    """A key of a Secret in the resource's namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="Secret name.")
    key: str = Field(default="token", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key inside the Secret.")


class HuggingFaceSource(_Model):
    """A Hugging Face Hub repository, downloaded by an init container into each worker pod."""

    repo: str = Field(max_length=200, pattern=r"^[A-Za-z0-9][-._A-Za-z0-9]*/[A-Za-z0-9][-._A-Za-z0-9]*$",
                      description="Repository id, e.g. google/diffusiongemma-26B-A4B-it.")
    revision: str = Field(default="main", min_length=1, max_length=200, pattern=r"^[-._/A-Za-z0-9]+$",
                          description="Branch, tag or commit to download (pin a commit for reproducible rollouts).")
    token_secret: SecretKeyRef | None = Field(default=None, description="Secret holding a Hub token "
                                              "(gated or private repositories); exposed to the download only.")


class PVCSource(_Model):
    """A model directory on an existing PersistentVolumeClaim, mounted read-only."""

    claim_name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="PersistentVolumeClaim name.")
    path: str = Field(default="", max_length=1024, pattern=r"^$|^[^/].*$",
                      description="Directory inside the claim (relative, no '..'); empty = the claim's root.")

    RULES = (Rule(
        cel="!self.path.contains('..')",
        message="pvc.path {m.path!r} must not contain '..': it is relative to the claim's root",
        message_expression="'pvc.path ' + self.path + ' must not contain .. (it is relative to the claim root)'",
        check=lambda m: ".." not in m.path,
    ),)


class ModelSource(_Model):
    """Where the diffusion model comes from: exactly one of ``huggingFace`` or ``pvc``."""

    hugging_face: HuggingFaceSource | None = Field(default=None, description="Download from the Hugging Face Hub.")
    pvc: PVCSource | None = Field(default=None, description="Read from a PersistentVolumeClaim.")

    RULES = (Rule(
        cel="has(self.huggingFace) != has(self.pvc)",
        message="model: set exactly one of huggingFace or pvc",
        message_expression="'model: set exactly one of huggingFace or pvc'",
        check=lambda m: (m.hugging_face is None) != (m.pvc is None),
    ),)


class FallbackModelSource(_Model):
    """The in-cluster fallback's model: a Hub repository, a PVC directory, or (neither) the
    SmolLM2-135M-Instruct bundled in the image."""

    hugging_face: HuggingFaceSource | None = Field(default=None, description="Download from the Hugging Face Hub.")
    pvc: PVCSource | None = Field(default=None, description="Read from a PersistentVolumeClaim.")

    RULES = (Rule(
        cel="!(has(self.huggingFace) && has(self.pvc))",
        message="fallback.inCluster.model: set at most one of huggingFace or pvc (neither = bundled SmolLM2)",
        message_expression="'fallback.inCluster.model: set at most one of huggingFace or pvc'",
        check=lambda m: m.hugging_face is None or m.pvc is None,
    ),)


class DiffusionSettings(_Model):
    """Sampler defaults of every request (unset = the checkpoint's generation_config.json)."""

    max_denoising_steps: int | None = Field(default=None, ge=1, le=1024, description="Step cap per canvas.")
    entropy_bound: float | None = Field(default=None, gt=0.0, le=100.0, description="Entropy-bound sampler budget "
                                        "(nats accepted per step; published default 0.1).")
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=100.0, description="Mean entropy under "
                                               "which a stable canvas commits early; 0 disables early stopping.")


class Replicas(_Model):
    """Replica bounds; min == max is a fixed count, min < max enables autoscaling."""

    min: int = Field(default=1, ge=1, le=256, description="Fewest replicas kept running.")
    max: int = Field(default=1, ge=1, le=256, description="Most replicas the autoscaler may start.")
    target_ongoing_requests: float | None = Field(default=None, gt=0.0, le=256.0, description="Average in-flight "
                                                  "requests per replica the autoscaler aims for (unset: serving "
                                                  "default).")

    RULES = (Rule(
        cel="self.min <= self.max",
        message="replicas: min {m.min} must be <= max {m.max}",
        message_expression="'replicas: min ' + string(self.min) + ' must be <= max ' + string(self.max)",
        check=lambda m: m.min <= m.max,
    ),)


class WorkerResources(_Model):
    """CPU and memory of one GPU worker pod (requests = limits: Guaranteed QoS for serving)."""

    cpu: str = Field(default="8", max_length=32, pattern=QUANTITY_PATTERN, description="CPU quantity.")
    memory: str = Field(default="64Gi", max_length=32, pattern=QUANTITY_PATTERN, description="Memory quantity.")


class HeadResources(_Model):
    """CPU and memory of the Ray head pod (requests = limits)."""

    cpu: str = Field(default="2", max_length=32, pattern=QUANTITY_PATTERN, description="CPU quantity.")
    memory: str = Field(default="8Gi", max_length=32, pattern=QUANTITY_PATTERN, description="Memory quantity.")


class FallbackResources(_Model):
    """CPU and memory of one in-cluster fallback pod (requests = limits)."""

    cpu: str = Field(default="4", max_length=32, pattern=QUANTITY_PATTERN, description="CPU quantity.")
    memory: str = Field(default="16Gi", max_length=32, pattern=QUANTITY_PATTERN, description="Memory quantity.")


class GPUResources(_Model):
    """The GPU worker pods that run the diffusion replicas."""

    gpus_per_worker: int = Field(default=1, ge=1, le=16, description="GPUs of one worker pod; a replica with "
                                 "tensorParallelSize N packs N of them (STRICT_PACK, one node).")
    gpu_resource_name: str = Field(default="nvidia.com/gpu", max_length=253,
                                   pattern=r"^[-._a-zA-Z0-9]+/[-._a-zA-Z0-9]+$",
                                   description="Extended resource that counts GPUs on the nodes.")
    accelerator_type: str | None = Field(default=None, max_length=64, pattern=r"^[-_A-Za-z0-9]+$",
                                         description="Ray accelerator type replicas must land on (e.g. H100); "
                                         "unset accepts any.")
    worker: WorkerResources = Field(default_factory=WorkerResources, description="CPU and memory of each GPU "
                                    "worker pod.")
    head: HeadResources = Field(default_factory=HeadResources, description="CPU and memory of the Ray head pod "
                                "(no GPU, runs no replica).")
    shared_memory: str = Field(default="16Gi", max_length=32, pattern=QUANTITY_PATTERN, description="Size of "
                               "/dev/shm on workers (Ray object store, NCCL).")


class InClusterFallback(_Model):
    """An autoregressive model served by the same Ray cluster, in its own worker group."""

    model: FallbackModelSource = Field(default_factory=FallbackModelSource, description="Its model; empty = the "
                                       "bundled SmolLM2-135M-Instruct.")
    gpus: int = Field(default=0, ge=0, le=8, description="GPUs per fallback pod (0 = CPU).")
    resources: FallbackResources = Field(default_factory=FallbackResources, description="CPU and memory of each "
                                         "fallback pod.")


class ExternalFallback(_Model):
    """An OpenAI-compatible server outside the RayService (e.g. vLLM serving Gemma 4)."""

    url: str = Field(max_length=2048, pattern=r"^https?://[^\s]+$", description="Base URL, e.g. "
                     "http://gemma4.inference.svc:8000/v1.")
    model: str = Field(min_length=1, max_length=253, description="Model name to request from it.")
    api_key_secret: SecretKeyRef | None = Field(default=None, description="Secret holding its API key "
                                                "(exposed to the proxy replicas as an environment variable).")
    request_timeout_seconds: float = Field(default=120.0, gt=0.0, le=3600.0, description="HTTP timeout per request.")


class Fallback(_Model):
    """Where overflow goes when every diffusion replica is full."""

    type: Literal["InCluster", "External", "Disabled"] = Field(default="Disabled", description="InCluster: an "
                                                                 "autoregressive model in this Ray cluster; External: "
                                                                 "an OpenAI-compatible URL; Disabled: no overflow "
                                                                 "(requests wait for a diffusion slot).")
    context_length: int | None = Field(default=None, ge=2, le=1_048_576, description="Context the fallback serves "
                                       "(checked again by the app at start-up); required unless Disabled.")
    replicas: Replicas = Field(default_factory=Replicas, description="Fallback replicas (for External: proxy "
                               "replicas).")
    max_batch: int = Field(default=16, ge=1, le=256, description="Requests one fallback replica generates at once.")
    in_cluster: InClusterFallback | None = Field(default=None, description="type=InCluster settings (defaults: "
                                                 "bundled SmolLM2 on CPU).")
    external: ExternalFallback | None = Field(default=None, description="type=External settings (required there).")

    RULES = (
        Rule(cel="self.type == 'Disabled' || has(self.contextLength)",
             message="fallback: contextLength is required for type {m.type}",
             message_expression="'fallback: contextLength is required for type ' + self.type",
             check=lambda m: m.type == "Disabled" or m.context_length is not None),
        Rule(cel="self.type != 'External' || has(self.external)",
             message="fallback: type External needs fallback.external (url, model)",
             message_expression="'fallback: type External needs fallback.external (url, model)'",
             check=lambda m: m.type != "External" or m.external is not None),
        Rule(cel="self.type == 'External' || !has(self.external)",
             message="fallback: external is set but type is {m.type}",
             message_expression="'fallback: external is set but type is ' + self.type",
             check=lambda m: m.type == "External" or m.external is None),
        Rule(cel="self.type == 'InCluster' || !has(self.inCluster)",
             message="fallback: inCluster is set but type is {m.type}",
             message_expression="'fallback: inCluster is set but type is ' + self.type",
             check=lambda m: m.type == "InCluster" or m.in_cluster is None),
    )


class Telemetry(_Model):
    """OpenTelemetry export (off unless an endpoint is set)."""

    otlp_endpoint: str | None = Field(default=None, max_length=2048, pattern=r"^[^\s]+$",
                                      description="OTLP/gRPC collector endpoint (host:port or URL).")
    sampling_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="Share of requests traced.")


class EndpointTLS(_Model):
    """TLS of the gRPC endpoint from Secrets in the resource's namespace (e.g. issued by cert-manager)."""

    secret_name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="kubernetes.io/tls Secret "
                             "with tls.crt and tls.key (and ca.crt, the client CA, unless clientCaSecretName is set); "
                             "mounted into the gRPC front, re-read when it changes (rotation without a restart).")
    client_auth: Literal["None", "Optional", "Require"] = Field(default="None", description="Mutual TLS: None "
                                                                "(server TLS only), Require (clients must present a "
                                                                "certificate signed by the client CA), Optional "
                                                                "(verified when presented).")
    client_ca_secret_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                                              description="Secret whose ca.crt is the client CA; unset: ca.crt of "
                                              "secretName.")


class EndpointAuth(_Model):
    """Bearer-token authentication (metadata ``authorization: Bearer <token>``); the health check stays open."""

    token_secret: SecretKeyRef = Field(description="Secret key holding the accepted token(s), one per line (two "
                                       "during a rotation); mounted into the front and the Ray pods, never an "
                                       "environment variable.")


class EndpointLimits(_Model):
    """Request limits of the gRPC endpoint (INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the limit)."""

    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=2**31 - 1, description="Largest request "
                                   "message in bytes.")
    max_prompt_chars: int = Field(default=4 * 1024 * 1024, ge=1, le=2**31 - 1, description="Most characters of "
                                  "prompt, chat messages and infill together.")
    max_new_tokens: int | None = Field(default=None, ge=1, le=1_048_576, description="Largest max_new_tokens "
                                       "accepted; unset: only the served context bounds it (OUT_OF_RANGE).")
    max_concurrent_per_client: int = Field(default=64, ge=0, le=1_000_000, description="Requests one client (its "
                                           "certificate's common name with mutual TLS, else its IP address) may "
                                           "have in flight per Ray pod; 0 = no cap.")


class Security(_Model):
    """TLS, authentication and limits of the gRPC endpoint (docs/security.md). A gRPC front runs beside Ray's
    gRPC proxy in every Ray pod (Ray 2.60's proxy has neither TLS nor interceptors)."""

    tls: EndpointTLS | None = Field(default=None, description="Serve TLS (mutual TLS with clientAuth).")
    allow_plaintext: bool = Field(default=False, description="Serve without TLS. Plaintext is never implied: "
                                  "without tls this must be true.")
    auth: EndpointAuth | None = Field(default=None, description="Bearer tokens; unset: none.")
    limits: EndpointLimits = Field(default_factory=EndpointLimits, description="Request limits.")

    RULES = (Rule(
        cel="!(has(self.tls) && self.allowPlaintext)",
        message="security: tls and allowPlaintext contradict each other: set one of them",
        message_expression="'security: tls and allowPlaintext contradict each other: set one of them'",
        check=lambda m: not (m.tls is not None and m.allow_plaintext),
    ),)


class LocalObjectReference(_Model):
    """A reference to an object by name in the same namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="Object name.")


class Toleration(_Model):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=316, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value (Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all.")
    toleration_seconds: int | None = Field(default=None, ge=0, description="NoExecute: how long the pod stays bound.")

    RULES = (Rule(
        cel="self.operator != 'Exists' || !has(self.value)",
        message="toleration: operator Exists takes no value (got {m.value!r})",
        message_expression="'toleration: operator Exists takes no value (got ' + self.value + ')'",
        check=lambda m: m.operator != "Exists" or m.value is None,
    ),)


class DiffusionGemmaSpec(_Model):
    """Desired state of one DiffusionGemma serving stack."""

    model: ModelSource = Field(description="The diffusion model (DiffusionGemma, Hugging Face format).")
    quantization: Literal["bf16", "fp8", "nvfp4"] = Field(default="bf16", description="Weight format the engine "
                                                          "serves.")
    context_length: int = Field(default=262_144, ge=512, le=1_048_576, description="Context (prompt + generated "
                                "tokens) promised to users; every backend must serve at least this or the app "
                                "refuses to become ready.")
    diffusion: DiffusionSettings = Field(default_factory=DiffusionSettings, description="Sampler defaults.")
    max_batch_per_replica: int = Field(default=4, ge=1, le=8, description="Requests one diffusion replica denoises "
                                       "at once (block diffusion is fastest at 1-8).")
    tensor_parallel_size: Literal[1, 2, 4, 8] = Field(default=1, description="GPUs one replica spans (one node).")
    replicas: Replicas = Field(default_factory=Replicas, description="Diffusion replicas.")
    resources: GPUResources = Field(default_factory=GPUResources, description="Pods and GPUs.")
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32, description="Node labels the GPU "
                                          "worker pods (and in-cluster fallback pods) must match.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Tolerations of the "
                                          "worker pods (e.g. for a GPU taint).")
    fallback: Fallback = Field(default_factory=Fallback, description="Overflow target.")
    grpc_port: int = Field(default=9000, ge=1024, le=65535, description="Port of the gRPC API (Serve's gRPC proxy "
                           "and the Service).")
    telemetry: Telemetry = Field(default_factory=Telemetry, description="Tracing.")
    security: Security | None = Field(default=None, description="TLS, tokens and limits of the gRPC endpoint: "
                                      "required, with tls.secretName or allowPlaintext: true (plaintext is never "
                                      "implied).")
    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=1024, pattern=r"^[^\s]+$",
                       description="Container image with dgserve and Ray (head, workers, model download).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(default="IfNotPresent",
                                                                         description="Image pull policy.")
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16,
                                                           description="Secrets for pulling the image.")
    upgrade_strategy: Literal["NewCluster", "None"] = Field(default="NewCluster", description="KubeRay upgrade "
                                                            "strategy for changes to the Ray cluster: NewCluster "
                                                            "(zero downtime, needs spare GPUs for a second cluster "
                                                            "during the switch) or None (in place, with downtime). "
                                                            "Changes that only touch the Serve app update in place.")

    RULES = (
        Rule(cel="self.tensorParallelSize <= self.resources.gpusPerWorker",
             message="tensorParallelSize {m.tensor_parallel_size} exceeds resources.gpusPerWorker "
                     "{m.resources.gpus_per_worker}: a replica packs its GPUs on one worker",
             message_expression="'tensorParallelSize ' + string(self.tensorParallelSize) + ' exceeds "
                                "resources.gpusPerWorker ' + string(self.resources.gpusPerWorker)",
             check=lambda m: m.tensor_parallel_size <= m.resources.gpus_per_worker),
        Rule(cel="self.tensorParallelSize > self.resources.gpusPerWorker "
                 "|| self.resources.gpusPerWorker % self.tensorParallelSize == 0",
             message="resources.gpusPerWorker {m.resources.gpus_per_worker} is not a multiple of "
                     "tensorParallelSize {m.tensor_parallel_size}: GPUs would sit idle",
             message_expression="'resources.gpusPerWorker ' + string(self.resources.gpusPerWorker) + ' is not a "
                                "multiple of tensorParallelSize ' + string(self.tensorParallelSize)",
             check=lambda m: m.tensor_parallel_size > m.resources.gpus_per_worker
             or m.resources.gpus_per_worker % m.tensor_parallel_size == 0),
        Rule(cel="self.fallback.type == 'Disabled' || !has(self.fallback.contextLength) "
                 "|| self.fallback.contextLength >= self.contextLength",
             message="fallback.contextLength {m.fallback.context_length} is below contextLength "
                     "{m.context_length}: overflowed requests could not be served",
             message_expression="'fallback.contextLength ' + string(self.fallback.contextLength) + ' is below "
                                "contextLength ' + string(self.contextLength)",
             check=lambda m: m.fallback.type == "Disabled" or m.fallback.context_length is None
             or m.fallback.context_length >= m.context_length),
        Rule(cel="!has(self.replicas.targetOngoingRequests) "
                 "|| self.replicas.targetOngoingRequests <= double(self.maxBatchPerReplica)",
             message="replicas.targetOngoingRequests {m.replicas.target_ongoing_requests} exceeds "
                     "maxBatchPerReplica {m.max_batch_per_replica}",
             message_expression="'replicas.targetOngoingRequests ' + string(self.replicas.targetOngoingRequests) "
                                "+ ' exceeds maxBatchPerReplica ' + string(self.maxBatchPerReplica)",
             check=lambda m: m.replicas.target_ongoing_requests is None
             or m.replicas.target_ongoing_requests <= m.max_batch_per_replica),
        Rule(cel="has(self.security) && (has(self.security.tls) || self.security.allowPlaintext)",
             message="security: set security.tls.secretName (TLS) or security.allowPlaintext: true (plaintext is "
                     "never implied)",
             message_expression="'security: set security.tls.secretName (TLS) or security.allowPlaintext: true "
                                "(plaintext is never implied)'",
             check=lambda m: m.security is not None and (m.security.tls is not None or m.security.allow_plaintext)),
        Rule(cel="!(self.grpcPort in [6379, 8000, 8080, 8265, 10001, 52365])",
             message="grpcPort {m.grpc_port} is taken by Ray (6379, 8000, 8080, 8265, 10001, 52365)",
             message_expression="'grpcPort ' + string(self.grpcPort) + ' is taken by Ray "
                                "(6379, 8000, 8080, 8265, 10001, 52365)'",
             check=lambda m: m.grpc_port not in RAY_RESERVED_PORTS),
    )

    @property
    def replicas_per_worker(self) -> int:
        """Diffusion replicas one GPU worker pod holds."""
        return self.resources.gpus_per_worker // self.tensor_parallel_size


# Root-level rule (metadata.name is the only metadata CEL may read).
NAME_RULE = Rule(
    cel=f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    message=f"metadata.name is longer than {MAX_NAME_LENGTH} characters: KubeRay derives longer names from it",
    message_expression=f"'metadata.name ' + self.metadata.name + ' is longer than {MAX_NAME_LENGTH} characters'",
    check=lambda name: len(name) <= MAX_NAME_LENGTH,
)


# --- status ----------------------------------------------------------------------------------


class Condition(_Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(max_length=316, pattern=r"^[A-Za-z][A-Za-z0-9]*$", description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                        description="CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"}, description="When status last "
                                      "changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation this condition "
                                            "was computed for.")


class DiffusionGemmaStatus(_Model):
    """Observed state, written by the operator (and only fields listed here: the API server prunes others)."""

    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="Ready, ContextVerified, "
                                        "FallbackReady, UpgradeInProgress, Degraded.",
                                        json_schema_extra={"x-kubernetes-list-type": "map",
                                                           "x-kubernetes-list-map-keys": ["type"]})
    ray_service: str | None = Field(default=None, description="Name of the RayService rendered for this resource.")
    service_status: str | None = Field(default=None, description="KubeRay's serviceStatus (legacy summary).")
    application_status: str | None = Field(default=None, description="Ray Serve application status (RUNNING, "
                                           "DEPLOYING, DEPLOY_FAILED, UNHEALTHY, ...).")
    ready_replicas: int | None = Field(default=None, ge=0, description="Diffusion replicas known to serve (at "
                                       "least); 0 until the app is healthy.")
    replicas: str | None = Field(default=None, description="ready/desired diffusion replicas, e.g. '1/1' or '2/2-4' "
                                 "with autoscaling.")
    promised_context_length: int | None = Field(default=None, ge=0, description="spec.contextLength.")
    served_context_length: int | None = Field(default=None, ge=0, description="Context the running app verified "
                                              "it serves (the smallest over its backends).")
    endpoint: str | None = Field(default=None, description="gRPC address of the API (Service DNS name and port).")
