"""Observability of the serving app: OpenTelemetry traces and Prometheus metrics, in one place.

Traces (off unless an OTLP endpoint is configured; see :func:`trace_settings`):

* the router continues the client's W3C trace context from the gRPC metadata (``traceparent``,
  ``tracestate``) or starts a trace, and opens a SERVER span per RPC with a ``dgserve.route`` child
  per routing decision;
* the router's span context rides to the backend inside :class:`~.messages.BackendRequest`
  (``trace_context``), so the replica's ``generate`` span is a child of the router's span;
* the diffusion replica turns every committed canvas (the engine's ``CanvasEvent``, with its
  wall-clock start and commit) into a ``dgserve.canvas`` span afterwards: nothing runs inside the
  engine's thread;
* start-up context verification is a ``dgserve.verify_context`` span in every component, always
  sampled.

When tracing is off every span is OpenTelemetry's ``INVALID_SPAN`` and the helpers below return at
their first line (``span.is_recording()`` is False); requests sampled out cost the same. No tracing
error ever reaches a request: span helpers log and carry on, the exporter runs on its own thread.

Metrics: :data:`METRICS` is the one catalogue (names, types, labels, buckets). They are Ray Serve
metrics, exported in Prometheus format by Ray's metrics agent on every node's metrics export port,
with Ray's ``ray_`` prefix and the ``deployment``/``replica``/``application`` labels Serve adds
(:func:`prometheus_names` lists what a scrape shows).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from dgserve.engine.types import CanvasEvent

    from .config import TelemetryConfig
    from .messages import BackendRequest, Final

log = logging.getLogger("dgserve.serving.telemetry")

DEFAULT_SAMPLING_RATIO = 0.1
DEFAULT_SERVICE_NAME = "dgserve"
STARTUP_SPAN = "dgserve.verify_context"
ROUTE_SPAN = "dgserve.route"
CANVAS_SPAN = "dgserve.canvas"
RPC_SERVICE = "dgserve.v1.DGServe"
TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()
_T = TypeVar("_T")


def _quiet(fn: Callable[..., _T]) -> Callable[..., _T | None]:
    """Telemetry never fails a request: log the error (once per function) and go on."""
    warned = False

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _T | None:
        nonlocal warned
        try:
            return fn(*args, **kwargs)
        except Exception:
            if not warned:
                warned = True
                log.warning("telemetry: %s failed (ignored; further failures are not logged)", fn.__qualname__,
                            exc_info=True)
            return None
    return wrapper


# --- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TraceSettings:
    """Where and how much to trace, resolved from the app config and the ``OTEL_*`` environment."""

    endpoint: str
    insecure: bool
    sampling_ratio: float
    service_name: str


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _env_ratio(environ: Mapping[str, str]) -> float | None:
    """The ratio that ``OTEL_TRACES_SAMPLER`` (+ ``_ARG``) asks for, None if unset or not a ratio sampler."""
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("always_on", "parentbased_always_on"):
        return 1.0
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            ratio = float(arg)
        except ValueError:
            log.warning("telemetry: OTEL_TRACES_SAMPLER_ARG=%r is not a number; sampling %g", arg,
                        DEFAULT_SAMPLING_RATIO)
            return None
        if not 0.0 <= ratio <= 1.0:
            log.warning("telemetry: OTEL_TRACES_SAMPLER_ARG=%r is outside [0, 1]; sampling %g", arg,
                        DEFAULT_SAMPLING_RATIO)
            return None
        return ratio
    if sampler:
        log.warning("telemetry: OTEL_TRACES_SAMPLER=%r is not supported (ratio samplers, always_on/off); sampling "
                    "%g", sampler, DEFAULT_SAMPLING_RATIO)
    return None


def trace_settings(cfg: TelemetryConfig, environ: Mapping[str, str] | None = None) -> TraceSettings | None:
    """Tracing settings, or None when tracing is off.

    The config wins where it says something; the standard variables fill in the rest:
    endpoint ``otlp_endpoint`` | ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` | ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (none: off); ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn tracing off whatever
    the config says; ratio ``sampling_ratio`` | ``OTEL_TRACES_SAMPLER``/``_ARG`` | 0.1; service name
    ``service_name`` | ``OTEL_SERVICE_NAME`` | ``dgserve``. ``https://`` endpoints use TLS, ``http://``
    and bare ``host:port`` plaintext unless ``OTEL_EXPORTER_OTLP[_TRACES]_INSECURE=false``. Headers,
    certificates, timeout, compression (``OTEL_EXPORTER_OTLP_*``) and batching (``OTEL_BSP_*``) are
    read by the OpenTelemetry SDK itself.
    """
    env = os.environ if environ is None else environ
    if _env_true(env.get("OTEL_SDK_DISABLED")) or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    endpoint = (cfg.otlp_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    if not endpoint:
        return None
    if endpoint.startswith("https://"):
        insecure = False
    else:
        flag = env.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE", env.get("OTEL_EXPORTER_OTLP_INSECURE"))
        insecure = flag is None or flag.strip().lower() != "false"
    ratio = cfg.sampling_ratio if cfg.sampling_ratio is not None else _env_ratio(env)
    return TraceSettings(
        endpoint=endpoint, insecure=insecure,
        sampling_ratio=DEFAULT_SAMPLING_RATIO if ratio is None else ratio,
        service_name=cfg.service_name or env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME)


# --- tracer --------------------------------------------------------------------------------------

def _sampler(ratio: float) -> Any:
    """Parent-based ratio sampling for requests (a sampled client trace is always continued); start-up
    spans (rare, and what an operator looks for when a deployment fails) are always sampled."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

    requests = ParentBased(TraceIdRatioBased(ratio))

    class DGServeSampler(Sampler):
        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                          trace_state=None):
            chosen = ALWAYS_ON if name == STARTUP_SPAN else requests
            return chosen.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"DGServeSampler{{startup=AlwaysOn, requests={requests.get_description()}}}"

    return DGServeSampler()


@functools.lru_cache(maxsize=None)
def _provider(settings: TraceSettings, component: str, instance: str) -> Any:
    """One SDK tracer provider per process and settings (not the global one: Ray installs its own)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attrs = {"service.name": settings.service_name, "service.namespace": "dgserve", "dgserve.component": component}
    if instance:
        attrs["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attrs), sampler=_sampler(settings.sampling_ratio))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint,
                                                                    insecure=settings.insecure)))
    log.info("telemetry: %s exports traces to %s (sampling %g)", component, settings.endpoint,
             settings.sampling_ratio)
    return provider


Carrier = Sequence[tuple[str, str]]


class Tracing:
    """The tracer of one component (router, diffusion, fallback), or the disabled one (:data:`NO_TRACING`)."""

    def __init__(self, tracer: Any | None = None, provider: Any | None = None) -> None:
        self._tracer = tracer
        self._provider = provider

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @classmethod
    def from_config(cls, cfg: TelemetryConfig, component: str, instance: str = "") -> Tracing:
        try:
            settings = trace_settings(cfg)
            if settings is None:
                return NO_TRACING
            provider = _provider(settings, component, instance)
            return cls(provider.get_tracer("dgserve.serving"), provider)
        except Exception:
            log.warning("telemetry: tracing could not start; serving without it", exc_info=True)
            return NO_TRACING

    def start(self, name: str, *, parent: Span | Carrier | None = None, kind: SpanKind = SpanKind.INTERNAL,
              attributes: Mapping[str, Any] | None = None, start_s: float | None = None) -> Span:
        """A started span (end it with :func:`end_span`); ``parent`` is a span, a W3C carrier (pairs) or
        None (a new trace). ``start_s``: wall-clock start (``time.time()``)."""
        if self._tracer is None:
            return INVALID_SPAN
        try:
            if isinstance(parent, Span):
                ctx = trace.set_span_in_context(parent)
            elif parent:
                ctx = _PROPAGATOR.extract(dict(parent))
            else:
                ctx = None
            start_ns = int(start_s * 1e9) if start_s else None
            return self._tracer.start_span(name, context=ctx, kind=kind, attributes=attributes, start_time=start_ns)
        except Exception:
            log.warning("telemetry: could not start span %r", name, exc_info=True)
            return INVALID_SPAN

    def server_span(self, method: str, grpc_context: Any) -> Span:
        """The router's span of one RPC, continuing the client's trace from the gRPC metadata."""
        if self._tracer is None:
            return INVALID_SPAN
        try:
            metadata = grpc_context.invocation_metadata() or ()
        except Exception:
            metadata = ()
        carrier = [(k, v) for k, v in metadata if k in TRACE_HEADERS]
        return self.start(f"{RPC_SERVICE}/{method}", parent=carrier, kind=SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": RPC_SERVICE, "rpc.method": method})

    @staticmethod
    def carrier(span: Span) -> tuple[tuple[str, str], ...]:
        """W3C trace context of ``span`` for the next hop (empty when it is not a real span)."""
        if not span.get_span_context().is_valid:
            return ()
        out: dict[str, str] = {}
        _PROPAGATOR.inject(out, context=trace.set_span_in_context(span))
        return tuple(out.items())

    def flush(self, timeout_s: float = 5.0) -> None:
        """Export what is buffered (before a failing constructor raises, so its span is not lost)."""
        if self._provider is not None:
            try:
                self._provider.force_flush(int(timeout_s * 1000))
            except Exception:
                log.warning("telemetry: flushing spans failed", exc_info=True)


NO_TRACING = Tracing()


# --- span helpers (no-ops on spans that are not recording) ----------------------------------------

def operation_name(req: BackendRequest) -> str:
    """GenAI ``gen_ai.operation.name``: chat for messages, text_completion for a prompt or infill."""
    return "chat" if req.messages else "text_completion"


@_quiet
def set_request(span: Span, req: BackendRequest, *, stream: bool | None = None) -> None:
    """GenAI request attributes (what the client asked for)."""
    if not span.is_recording():
        return
    attrs: dict[str, Any] = {"gen_ai.operation.name": operation_name(req), "dgserve.request_id": req.request_id}
    if req.max_new_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = req.max_new_tokens
    if req.seed is not None:
        attrs["gen_ai.request.seed"] = req.seed
    for key, attr in (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p")):
        if key in req.sampling:
            attrs[attr] = float(req.sampling[key])
    for key in ("max_denoising_steps", "entropy_bound", "confidence_threshold"):
        if key in req.sampling:
            attrs[f"dgserve.request.{key}"] = req.sampling[key]
    if stream is not None:
        attrs["gen_ai.request.stream"] = stream
    if req.pinned:
        attrs["dgserve.request.pinned_positions"] = len(req.pinned)
    if req.infill_suffix or req.infill_prefix:
        attrs["dgserve.request.infill"] = True
    span.set_attributes(attrs)


@_quiet
def set_attributes(span: Span, attributes: Mapping[str, Any]) -> None:
    if span.is_recording():
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


@_quiet
def set_final(span: Span, final: Final) -> None:
    """GenAI response and usage attributes from a backend's Final."""
    if not span.is_recording():
        return
    attrs: dict[str, Any] = {
        "gen_ai.response.model": final.model, "gen_ai.response.finish_reasons": (final.finish_reason,),
        "gen_ai.usage.input_tokens": final.prompt_tokens, "gen_ai.usage.output_tokens": final.completion_tokens,
        "gen_ai.response.time_to_first_chunk": final.first_chunk_s,
        "dgserve.backend": final.backend, "dgserve.replica": final.replica,
        "dgserve.replica_in_flight": final.replica_in_flight,
    }
    if final.steps_per_canvas:
        attrs["dgserve.canvases"] = len(final.steps_per_canvas)
        attrs["dgserve.steps_per_canvas"] = tuple(final.steps_per_canvas)
        attrs["dgserve.tokens_per_step"] = final.tokens_per_step
    span.set_attributes(attrs)


@_quiet
def end_span(span: Span, code: str = "OK", message: str = "", *, rpc: bool = True) -> None:
    """End ``span`` with a gRPC status code name (anything but OK marks it as an error; ``rpc``: also set
    ``rpc.grpc.status_code``)."""
    if not span.is_recording():
        return
    if rpc:
        import grpc

        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
    if code != "OK":
        span.set_attribute("error.type", code)
        span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"[:512]))
    span.end()


@contextlib.contextmanager
def verifying_context(tracing: Tracing, component: str, backend: str, promised: int) -> Iterator[Span]:
    """A ``dgserve.verify_context`` span around one start-up check of the served context length.

    Set ``dgserve.context.served`` (and the model) on the yielded span; an exception marks the check
    as refused (with the served length and binding limit of a ContextVerificationError), is flushed to
    the collector at once (the process is about to fail) and propagates.
    """
    span = tracing.start(STARTUP_SPAN, attributes={"dgserve.component": component, "dgserve.backend": backend,
                                                   "dgserve.context.promised": promised})
    try:
        yield span
    except BaseException as e:
        if span.is_recording():
            set_attributes(span, {"dgserve.context.verified": False,
                                  "dgserve.context.served": getattr(e, "served", None),
                                  "dgserve.context.binding_limit": getattr(e, "cause", None)})
            _record_exception(span, e)
            end_span(span, "FAILED_PRECONDITION", str(e), rpc=False)
            tracing.flush()
        raise
    set_attributes(span, {"dgserve.context.verified": True})
    end_span(span, rpc=False)


@_quiet
def _record_exception(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)


@_quiet
def canvas_span(tracing: Tracing, parent: Span, ev: CanvasEvent) -> None:
    """One finished span for a committed canvas, placed at its real start and commit times."""
    if not parent.is_recording():
        return
    steps = max(ev.steps, 0)
    tokens = len(ev.token_ids)
    span = tracing.start(CANVAS_SPAN, parent=parent, start_s=ev.started_at or None, attributes={
        "dgserve.canvas.index": ev.canvas_index,
        "dgserve.canvas.steps": steps,
        "dgserve.canvas.accepted_per_step": tuple(int(a) for a in ev.accepted_per_step),
        "dgserve.canvas.converged_by": ev.converged_by,
        "dgserve.canvas.mean_entropy": float(ev.mean_entropy),
        "dgserve.canvas.tokens": tokens,
        "dgserve.canvas.tokens_per_step": tokens / steps if steps else 0.0,
    })
    span.end(end_time=int(ev.committed_at * 1e9) if ev.committed_at else None)


# --- metrics -------------------------------------------------------------------------------------

PROMETHEUS_PREFIX = "ray_"  # Ray's metrics agent prefixes every application metric
Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    emitted_by: tuple[str, ...]  # deployments that record it (Serve adds their name as the `deployment` label)
    labels: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


LATENCY_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_S = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64)
STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
TOKENS_PER_STEP = (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)

ROUTER, DIFFUSION = ("Router",), ("DiffusionReplica",)
BACKENDS = ("DiffusionReplica", "AutoregressiveFallback")

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("dgserve_router_requests_total", "counter", "Requests the router answered, by the backend that "
               "served them ('none': refused before a backend was chosen) and gRPC status code.", ROUTER,
               ("backend", "code")),
    MetricSpec("dgserve_router_request_seconds", "histogram", "Time from a request's arrival at the router to its "
               "answer (whole stream for GenerateStream), by backend and gRPC status code.", ROUTER,
               ("backend", "code"), LATENCY_S),
    MetricSpec("dgserve_router_overflow_total", "counter", "ANY requests sent to the autoregressive fallback "
               "because every diffusion slot was taken.", ROUTER),
    MetricSpec("dgserve_router_queue_wait_seconds", "histogram", "Time a request waited for a slot (0 when one was "
               "free), by what it may run on: diffusion_only (DIFFUSION_ONLY, pinned positions, infill, or no "
               "overflow), any, autoregressive_only.", ROUTER, ("routing",), QUEUE_S),
    MetricSpec("dgserve_router_queue_length", "gauge", "Requests waiting for a slot.", ROUTER),
    MetricSpec("dgserve_router_slots", "gauge", "Slots the router holds per backend (healthy replicas x batch cap "
               "/ routers).", ROUTER, ("backend",)),
    MetricSpec("dgserve_router_slots_in_use", "gauge", "Slots in use per backend.", ROUTER, ("backend",)),
    MetricSpec("dgserve_context_promised_tokens", "gauge", "Context length (prompt + generated tokens) promised "
               "to users (promised_context_length).", ROUTER),
    MetricSpec("dgserve_context_served_tokens", "gauge", "Context length each backend serves, as the router "
               "verified it at start-up (the router refuses to start below the promise).", ROUTER,
               ("backend", "model")),
    MetricSpec("dgserve_replica_in_flight", "gauge", "Requests in flight on this replica (its batch).",
               BACKENDS),
    MetricSpec("dgserve_replica_batch_size", "histogram", "Requests in flight on the replica when a request was "
               "admitted, that one included (block diffusion is fastest at 1-8).",
               BACKENDS, (), BATCH),
    MetricSpec("dgserve_generated_tokens_total", "counter", "Output tokens produced (committed canvases; fallback "
               "tokens).", BACKENDS),
    MetricSpec("dgserve_canvas_steps", "histogram", "Denoising steps per committed canvas, by why it committed "
               "(stable: converged early; step_cap: ran max_denoising_steps).", DIFFUSION,
               ("converged_by",), STEPS),
    MetricSpec("dgserve_canvas_tokens_per_step", "histogram", "Tokens a canvas committed per denoising step.",
               DIFFUSION, (), TOKENS_PER_STEP),
    MetricSpec("dgserve_time_to_first_canvas_seconds", "histogram", "Time from a request's start on the replica to "
               "its first committed canvas (prefill + first canvas's denoising).", DIFFUSION, (), LATENCY_S),
)
METRIC_SPECS = {m.name: m for m in METRICS}


def prometheus_names(spec: MetricSpec) -> tuple[str, ...]:
    """The series names a Prometheus scrape shows for ``spec``."""
    base = PROMETHEUS_PREFIX + spec.name
    if spec.kind == "histogram":
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    return (base,)


def exported_series() -> frozenset[str]:
    return frozenset(n for m in METRICS for n in prometheus_names(m))


def _make_metrics(names: Iterable[str]) -> dict[str, Any]:
    """Ray Serve metric objects for ``names`` (empty outside a Ray worker: recording is then a no-op)."""
    try:
        from ray.serve.metrics import Counter, Gauge, Histogram
    except Exception:  # pragma: no cover - ray is a dependency of serving
        return {}
    out: dict[str, Any] = {}
    for name in names:
        m = METRIC_SPECS[name]
        try:
            if m.kind == "counter":
                out[name] = Counter(m.name, description=m.description, tag_keys=m.labels)
            elif m.kind == "gauge":
                out[name] = Gauge(m.name, description=m.description, tag_keys=m.labels)
            else:
                out[name] = Histogram(m.name, description=m.description, boundaries=list(m.boundaries),
                                      tag_keys=m.labels)
        except Exception:
            log.warning("telemetry: metric %s unavailable", name, exc_info=True)
    return out


class _Metrics:
    def __init__(self, names: Iterable[str]) -> None:
        self._m = _make_metrics(names)

    def _inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0 and name in self._m:
            self._m[name].inc(value, tags=tags or None)

    def _set(self, name: str, value: float, **tags: str) -> None:
        if name in self._m:
            self._m[name].set(value, tags=tags or None)

    def _observe(self, name: str, value: float, **tags: str) -> None:
        if name in self._m:
            self._m[name].observe(value, tags=tags or None)


class RouterMetrics(_Metrics):
    """What the router records (its methods never raise). Ray drops a gauge that is not set again within
    two export intervals, so the router re-sets its gauges on every capacity refresh."""

    def __init__(self) -> None:
        super().__init__(m.name for m in METRICS if "Router" in m.emitted_by)
        self._context: tuple[int, Mapping[str, tuple[str, int]]] | None = None

    @_quiet
    def routed(self, *, routing: str, waited_s: float, overflow: bool) -> None:
        self._observe("dgserve_router_queue_wait_seconds", waited_s, routing=routing)
        if overflow:
            self._inc("dgserve_router_overflow_total")

    @_quiet
    def answered(self, backend: str, code: str, seconds: float) -> None:
        self._inc("dgserve_router_requests_total", backend=backend, code=code)
        self._observe("dgserve_router_request_seconds", seconds, backend=backend, code=code)

    @_quiet
    def refresh(self, waiting: int, slots: Mapping[str, tuple[int, int]]) -> None:
        """Queue length, per backend (capacity, in use), and the verified context again."""
        self._set("dgserve_router_queue_length", waiting)
        for backend, (capacity, in_use) in slots.items():
            self._set("dgserve_router_slots", capacity, backend=backend)
            self._set("dgserve_router_slots_in_use", in_use, backend=backend)
        if self._context is not None:
            promised, served = self._context
            self._set("dgserve_context_promised_tokens", promised)
            for backend, (model, tokens) in served.items():
                self._set("dgserve_context_served_tokens", tokens, backend=backend, model=model)

    def context(self, promised: int, served: Mapping[str, tuple[str, int]]) -> None:
        """What start-up verified (``served``: backend -> (model, served context length)); exported from the
        next refresh on."""
        self._context = (promised, dict(served))


class ReplicaMetrics(_Metrics):
    """What a backend replica records (its methods never raise). ``in_flight`` is re-set whenever the
    router reads the replica's routing stats, so the gauge never lapses while the replica is idle."""

    def __init__(self, deployment: str) -> None:
        super().__init__(m.name for m in METRICS if deployment in m.emitted_by)

    @_quiet
    def admitted(self, in_flight: int) -> None:
        self._set("dgserve_replica_in_flight", in_flight)
        self._observe("dgserve_replica_batch_size", in_flight)

    @_quiet
    def in_flight(self, n: int) -> None:
        self._set("dgserve_replica_in_flight", max(n, 0))

    @_quiet
    def tokens(self, n: int) -> None:
        self._inc("dgserve_generated_tokens_total", n)

    @_quiet
    def canvas(self, steps: int, tokens: int, converged_by: str) -> None:
        self._observe("dgserve_canvas_steps", steps, converged_by=converged_by)
        if steps > 0:
            self._observe("dgserve_canvas_tokens_per_step", tokens / steps)
        self._inc("dgserve_generated_tokens_total", tokens)

    @_quiet
    def first_canvas(self, seconds: float) -> None:
        self._observe("dgserve_time_to_first_canvas_seconds", seconds)
