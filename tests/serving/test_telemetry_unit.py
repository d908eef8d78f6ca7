"""Telemetry without Ray: settings from the config and the OTEL_* variables, the sampler, span helpers,
and the real OTLP exporter delivering to a real in-process OTLP/gRPC receiver."""

from __future__ import annotations

import asyncio
import inspect
import re
import time

import pytest
import yaml
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes
from opentelemetry.trace import INVALID_SPAN

from dgserve.engine.types import CanvasEvent
from dgserve.operator.render import Owner, build_rayservice, parse_spec
from dgserve.serving import diffusion, fallback, router, telemetry
from dgserve.serving.client import make_request
from dgserve.serving.config import AppConfig, TelemetryConfig
from dgserve.serving.messages import BackendRequest, Chunk, Final
from dgserve.serving.otlp_receiver import Receiver, format_trace
from dgserve.serving.router import DIFFUSION, Router
from dgserve.serving.slots import Admission
from dgserve.serving.telemetry import NO_TRACING, TraceSettings, Tracing, trace_settings

OTEL_VARS = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
             "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SERVICE_NAME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in OTEL_VARS:
        monkeypatch.delenv(var, raising=False)


def settings(endpoint, ratio=0.1, name="dgserve", insecure=True):
    return TraceSettings(endpoint=endpoint, insecure=insecure, sampling_ratio=ratio, service_name=name)


@pytest.mark.parametrize(("cfg", "env", "expected"), [
    ({}, {}, None),  # off by default
    ({"otlp_endpoint": "c:4317"}, {}, settings("c:4317")),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317"}, settings("http://env:4317")),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "a:1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "t:2"}, settings("t:2")),
    ({"otlp_endpoint": "cfg:1"}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "env:2"}, settings("cfg:1")),  # config wins
    ({"otlp_endpoint": "c:1"}, {"OTEL_SDK_DISABLED": "true"}, None),  # kill switches win over everything
    ({"otlp_endpoint": "c:1"}, {"OTEL_TRACES_EXPORTER": "none"}, None),
    ({"otlp_endpoint": "https://c:1"}, {}, settings("https://c:1", insecure=False)),
    ({"otlp_endpoint": "c:1"}, {"OTEL_EXPORTER_OTLP_INSECURE": "false"}, settings("c:1", insecure=False)),
    ({"otlp_endpoint": "c:1"}, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
     settings("c:1", 0.5)),
    ({"otlp_endpoint": "c:1"}, {"OTEL_TRACES_SAMPLER": "always_on"}, settings("c:1", 1.0)),
    ({"otlp_endpoint": "c:1", "sampling_ratio": 0.25}, {"OTEL_TRACES_SAMPLER": "always_on"}, settings("c:1", 0.25)),
    ({"otlp_endpoint": "c:1"}, {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"},
     settings("c:1", 0.1)),  # a bad variable never stops serving: the default ratio
    ({"otlp_endpoint": "c:1"}, {"OTEL_SERVICE_NAME": "gemma-prod"}, settings("c:1", name="gemma-prod")),
    ({"otlp_endpoint": "c:1", "service_name": "mine"}, {"OTEL_SERVICE_NAME": "x"}, settings("c:1", name="mine")),
])
def test_trace_settings_from_config_and_otel_environment(cfg, env, expected):
    assert trace_settings(TelemetryConfig(**cfg), env) == expected


def test_tracing_is_off_by_default_and_then_does_nothing():
    tracing = Tracing.from_config(TelemetryConfig(), "router")
    assert tracing is NO_TRACING and not tracing.enabled
    span = tracing.start("x", parent=(("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),))
    assert span is INVALID_SPAN and Tracing.carrier(span) == ()
    # helpers return at once on a span that does not record
    telemetry.set_request(span, BackendRequest("r", prompt="hi"))
    telemetry.canvas_span(tracing, span, _canvas(0))
    telemetry.end_span(span, "INTERNAL", "boom")


def _canvas(i, started=1_000.0, committed=1_000.5):
    return CanvasEvent(request_id="r", canvas_index=i, token_ids=(1, 2, 3, 4), text_delta="abcd", steps=4,
                       accepted_per_step=(1, 1, 0, 2), converged_by="stable", mean_entropy=0.25,
                       started_at=started, committed_at=committed)


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as r:
        yield r


def _tracing(receiver, ratio):
    tracing = Tracing.from_config(TelemetryConfig(otlp_endpoint=receiver.endpoint, sampling_ratio=ratio), "unit")
    assert tracing.enabled
    return tracing


def test_spans_reach_a_real_otlp_receiver_with_parents_and_canvas_times(receiver):
    tracing = _tracing(receiver, 1.0)
    req = BackendRequest("req-1", messages=(("user", "hi"),), max_new_tokens=8, sampling={"temperature": 0.5})
    root = tracing.start("router", parent=None)
    child = tracing.start("chat tiny", parent=Tracing.carrier(root))  # across a process boundary: W3C carrier
    telemetry.set_request(child, req)
    now = time.time()
    telemetry.canvas_span(tracing, child, _canvas(0, now - 2.0, now - 1.5))
    telemetry.set_final(child, Final(finish_reason="length", prompt_tokens=5, completion_tokens=8, model="tiny",
                                     backend="diffusion", replica="r1", replica_in_flight=1, first_chunk_s=0.1,
                                     seconds=0.2, steps_per_canvas=(4,), tokens_per_step=1.0))
    telemetry.end_span(child, rpc=False)
    telemetry.end_span(root, "RESOURCE_EXHAUSTED", "full")
    tracing.flush()
    tid = format(root.get_span_context().trace_id, "032x")
    spans = receiver.wait_for(lambda _: len(receiver.trace(tid)) == 3 and receiver.trace(tid))
    by_name = {s.name: s for s in spans}
    r, c, cv = by_name["router"], by_name["chat tiny"], by_name[telemetry.CANVAS_SPAN]
    assert r.parent_id == "" and c.parent_id == r.span_id and cv.parent_id == c.span_id
    assert cv.start_ns == int((now - 2.0) * 1e9) and cv.end_ns == int((now - 1.5) * 1e9)
    assert cv.attributes["dgserve.canvas.accepted_per_step"] == (1, 1, 0, 2)
    assert cv.attributes["dgserve.canvas.converged_by"] == "stable"
    assert c.attributes["gen_ai.operation.name"] == "chat" and c.attributes["gen_ai.request.max_tokens"] == 8
    assert c.attributes["gen_ai.usage.output_tokens"] == 8 and c.attributes["gen_ai.response.model"] == "tiny"
    assert r.status_code == 2 and r.attributes["rpc.grpc.status_code"] == 8 and "full" in r.status_message
    assert c.resource["service.name"] == "dgserve" and c.resource["dgserve.component"] == "unit"
    assert "canvas" in format_trace(spans)


def test_sampling_drops_new_traces_but_continues_a_sampled_client_and_keeps_start_up(receiver):
    tracing = _tracing(receiver, 0.0)
    dropped = tracing.start("dropped", parent=None)
    assert not dropped.is_recording() and Tracing.carrier(dropped)  # context still travels, unsampled
    client_tid, client_sid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    kept = tracing.start("continued", parent=(("traceparent", f"00-{client_tid}-{client_sid}-01"),))
    kept.end()
    with telemetry.verifying_context(tracing, "unit", "diffusion", 64) as span:
        telemetry.set_attributes(span, {"dgserve.context.served": 128})
    with pytest.raises(ValueError), telemetry.verifying_context(tracing, "unit", "fallback", 64):
        raise ValueError("serves 32 < 64")
    tracing.flush()
    got = receiver.wait_for(lambda spans: (
        [s for s in spans if s.name == "continued"] and
        len([s for s in spans if s.name == telemetry.STARTUP_SPAN and s.resource["dgserve.component"] == "unit"]) == 2
        and spans))
    (cont,) = [s for s in got if s.name == "continued"]
    assert cont.trace_id == client_tid and cont.parent_id == client_sid
    assert not [s for s in got if s.name == "dropped"]
    startup = {s.attributes["dgserve.backend"]: s for s in got if s.name == telemetry.STARTUP_SPAN}
    assert startup["diffusion"].attributes["dgserve.context.verified"] is True
    assert startup["diffusion"].attributes["dgserve.context.served"] == 128
    assert startup["fallback"].attributes["dgserve.context.verified"] is False
    assert startup["fallback"].status_code == 2 and "exception" in startup["fallback"].events


class _BrokenSpan:
    """A span whose every call fails (stands in for a broken SDK): helpers must swallow it."""

    def is_recording(self):
        return True

    def __getattr__(self, name):
        raise RuntimeError(f"broken span: {name}")


def test_span_helpers_never_raise():
    span = _BrokenSpan()
    telemetry.set_request(span, BackendRequest("r", prompt="x"))
    telemetry.set_attributes(span, {"a": 1})
    telemetry.end_span(span, "OK")
    telemetry.canvas_span(NO_TRACING, span, _canvas(0))


def test_unreachable_collector_costs_the_caller_nothing():
    tracing = Tracing.from_config(TelemetryConfig(otlp_endpoint="127.0.0.1:9", sampling_ratio=1.0), "dead")
    t0 = time.perf_counter()
    for i in range(200):
        span = tracing.start("x")
        telemetry.canvas_span(tracing, span, _canvas(i))
        telemetry.end_span(span)
    assert time.perf_counter() - t0 < 2.0  # export happens on the SDK's thread, never in the request


def test_gen_ai_attribute_names_are_semantic_conventions():
    known = {v for k, v in vars(gen_ai_attributes).items() if k.startswith("GEN_AI_")}
    source = "".join(inspect.getsource(m) for m in (telemetry, router, diffusion, fallback))
    used = set(re.findall(r'"(gen_ai\.[a-z_.]+)', source))
    assert {"gen_ai.request.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"} <= used
    assert used <= known, used - known


def test_operator_telemetry_spec_reaches_the_app():
    """CR spec.telemetry -> rendered RayService serveConfigV2 -> AppConfig the app validates -> trace settings."""
    spec = parse_spec({"model": {"pvc": {"claimName": "models", "path": "dg"}}, "security": {"allowPlaintext": True},
                       "telemetry": {"otlpEndpoint": "otel-collector.observability.svc:4317", "samplingRatio": 0.25}})
    rs = build_rayservice(spec, Owner("gemma", "ml", "uid"))
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    cfg = AppConfig.model_validate(app["args"])
    assert trace_settings(cfg.telemetry, {}) == settings("otel-collector.observability.svc:4317", 0.25)
    off = parse_spec({"model": {"pvc": {"claimName": "models", "path": "dg"}}, "security": {"allowPlaintext": True}})
    (app,) = yaml.safe_load(build_rayservice(off, Owner("g", "ml", "u"))["spec"]["serveConfigV2"])["applications"]
    assert trace_settings(AppConfig.model_validate(app["args"]).telemetry, {}) is None


def test_metric_catalogue_follows_prometheus_naming():
    for m in telemetry.METRICS:
        assert m.name.startswith("dgserve_") and m.name == m.name.lower()
        assert (m.kind == "counter") == m.name.endswith("_total"), m.name
        if "seconds" in m.name:
            assert m.kind == "histogram" and m.name.endswith("_seconds"), m.name
        assert m.kind != "histogram" or list(m.boundaries) == sorted(m.boundaries)
        assert "replica" not in m.labels and "deployment" not in m.labels  # Serve adds those
    assert "ray_dgserve_canvas_steps_bucket" in telemetry.exported_series()


# --- the router's spans, without Ray --------------------------------------------------------------

class _GatedHandle:
    """Stands in for a Serve DeploymentHandle (no Ray here): ``generate_unary.remote(req)`` records the
    request and answers once ``gate`` is set."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate, self.requests = gate, []
        self.generate_unary = self

    def remote(self, req):
        self.requests.append(req)

        async def answer():
            await self.gate.wait()
            return [Chunk(0, "hi", (5, 6), 4), Final(
                finish_reason="length", prompt_tokens=3, completion_tokens=2, model="m", backend="diffusion",
                replica="r1", replica_in_flight=1, first_chunk_s=0.01, seconds=0.02, steps_per_canvas=(4,),
                tokens_per_step=0.5)]
        return answer()


class _Ctx:
    def __init__(self, metadata=()):
        self.metadata, self.code = list(metadata), None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        pass

    def set_trailing_metadata(self, md):
        pass


class _RecordingMetrics:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))


def _router(tracing, handle):
    r = object.__new__(Router)  # no Serve context: wire the parts by hand
    r.cfg = AppConfig.model_validate({"promised_context_length": 64, "diffusion": {"engine": {"model": "m"}},
                                      "fallback": {"enabled": False}, "router": {"queue_size": 4}})
    r.handles = {DIFFUSION: handle}
    r.admission = Admission((DIFFUSION,), 4)
    r.admission.set_capacity(DIFFUSION, 1)
    r._metrics, r._tracing = _RecordingMetrics(), tracing
    return r


def test_router_traces_a_queued_request_and_propagates_its_context(receiver):
    async def run(tracing):
        gate = asyncio.Event()
        handle = _GatedHandle(gate)
        router = _router(tracing, handle)
        first = asyncio.create_task(router.Generate(make_request("a", request_id="q-first"), _Ctx()))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(router.Generate(make_request("b", request_id="q-second"), _Ctx()))
        await asyncio.sleep(0.2)  # waits in the queue behind the first
        gate.set()
        await asyncio.gather(first, second)
        return router, handle

    tracing = _tracing(receiver, 1.0)
    router, handle = asyncio.run(run(tracing))
    tracing.flush()
    assert all(dict(req.trace_context).get("traceparent") for req in handle.requests)
    spans = receiver.wait_for(lambda s: (r := [x for x in s if x.attributes.get("dgserve.request_id") == "q-second"])
                              and [x for x in s if x.trace_id == r[0].trace_id and x.name == telemetry.ROUTE_SPAN])
    (route,) = spans
    assert route.attributes["dgserve.routing.reason"] == "queue_wait"
    assert route.attributes["dgserve.routing.queue_wait_s"] >= 0.15
    assert route.attributes["dgserve.routing.queued_before"] == 0 and "rpc.grpc.status_code" not in route.attributes
    waits = [k["waited_s"] for name, _, k in router._metrics.calls if name == "routed"]
    assert len(waits) == 2 and waits[1] >= 0.15 > waits[0]
    assert [a for name, a, _ in router._metrics.calls if name == "answered"][-1][:2] == ("diffusion", "OK")

    # tracing off: nothing travels with the request
    router, handle = asyncio.run(run(NO_TRACING))
    assert [req.trace_context for req in handle.requests] == [(), ()]
