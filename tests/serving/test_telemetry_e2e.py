"""Traces and metrics end to end on the session's real local Ray Serve: gRPC over loopback -> Router ->
DiffusionReplica (real engine, tiny checkpoint) / AutoregressiveFallback (real SmolLM2), traced with the
real OTLP exporter into a real OTLP/gRPC receiver started here, metrics scraped from Ray's real
metrics agent (Prometheus text format).

One app for the module (1 diffusion replica capped at 2, the fallback, sampling 1.0). The SDK batches
spans for up to 5 s and Ray exports metrics about every 10 s, so every check waits on a condition.
"""

from __future__ import annotations

import time
import urllib.request
from collections import Counter

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dgserve.serving import telemetry
from dgserve.serving.client import Client, make_request
from dgserve.serving.otlp_receiver import Receiver, ReceivedSpan
from dgserve.v1 import dgserve_pb2 as pb

from serving_testlib import app_config, deployed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

APP = "dgserve-telemetry"
CAP = 2
DIFF, AR = pb.BACKEND_DIFFUSION, pb.BACKEND_AUTOREGRESSIVE
SERVER = 2  # OTLP SpanKind SERVER
FALLBACK_MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def client(tiny_model, serve_port, receiver):
    cfg = app_config(tiny_model, serve_port, name=APP, diffusion={"engine": {"max_batch": CAP}},
                     telemetry={"otlp_endpoint": receiver.endpoint, "sampling_ratio": 1.0})
    with deployed(cfg) as c:
        yield c


class Sent:
    """What this module's clients saw, by (backend, code): the metrics must end up saying the same."""

    def __init__(self) -> None:
        self.answers: Counter[tuple[str, str]] = Counter()
        self.overflowed = 0
        self.diffusion_tokens = self.fallback_tokens = self.canvases = 0

    def ok(self, r: pb.GenerateResponse, *, overflow: bool = False) -> pb.GenerateResponse:
        backend = "diffusion" if r.backend == DIFF else "autoregressive"
        self.answers[(backend, "OK")] += 1
        self.overflowed += overflow
        if r.backend == DIFF:
            self.diffusion_tokens += r.usage.completion_tokens
            self.canvases += r.denoising.canvases
        else:
            self.fallback_tokens += r.usage.completion_tokens
        return r


@pytest.fixture(scope="module")
def sent():
    return Sent()


# --- traces ----------------------------------------------------------------------------------------

def _router_span(spans: list[ReceivedSpan], request_id: str) -> ReceivedSpan | None:
    return next((s for s in spans if s.kind == SERVER and s.attributes.get("dgserve.request_id") == request_id), None)


def _whole_trace(receiver: Receiver, request_id: str, complete, timeout_s: float = 40.0) -> list[ReceivedSpan]:
    """The trace of one request once ``complete(spans_of_that_trace)`` holds."""
    def ready(spans):
        root = _router_span(spans, request_id)
        if root is None:
            return None
        trace = [s for s in spans if s.trace_id == root.trace_id]
        return trace if complete(trace) else None
    return receiver.wait_for(ready, timeout_s)


def _one(spans, **where) -> ReceivedSpan:
    found = [s for s in spans if all(_match(s, k, v) for k, v in where.items())]
    assert len(found) == 1, (where, [(s.name, s.attributes) for s in spans])
    return found[0]


def _match(s: ReceivedSpan, key: str, value) -> bool:
    if key == "name":
        return s.name == value
    if key == "name_prefix":
        return s.name.startswith(value)
    return s.attributes.get(key.replace("__", ".")) == value


def test_one_request_is_one_trace_router_replica_canvases(client, receiver, sent):
    r = sent.ok(client.generate(make_request("Hello", max_new_tokens=40, seed=1), timeout=120))
    assert r.backend == DIFF and r.denoising.canvases >= 2
    spans = _whole_trace(receiver, r.request_id, lambda t: sum(s.name == telemetry.CANVAS_SPAN for s in t)
                         == r.denoising.canvases and any(s.name == telemetry.ROUTE_SPAN for s in t))
    router = _router_span(spans, r.request_id)
    route = _one(spans, name=telemetry.ROUTE_SPAN)
    replica = _one(spans, name_prefix="text_completion ")
    canvases = sorted((s for s in spans if s.name == telemetry.CANVAS_SPAN),
                      key=lambda s: s.attributes["dgserve.canvas.index"])
    assert router.name == "dgserve.v1.DGServe/Generate" and router.parent_id == ""
    assert {s.trace_id for s in spans} == {router.trace_id}
    assert route.parent_id == router.span_id and replica.parent_id == router.span_id
    assert all(c.parent_id == replica.span_id for c in canvases)
    # the routing decision
    assert route.attributes["dgserve.backend"] == "diffusion" and route.attributes["dgserve.routing.reason"] == \
        "capacity"
    assert route.attributes["dgserve.routing.candidates"] == ("diffusion", "autoregressive")
    # GenAI attributes on the router and the replica
    assert router.attributes["gen_ai.request.max_tokens"] == 40 and router.attributes["gen_ai.request.seed"] == 1
    assert router.attributes["gen_ai.usage.output_tokens"] == r.usage.completion_tokens
    assert router.attributes["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens
    assert router.attributes["gen_ai.response.model"] == r.model and router.attributes["rpc.grpc.status_code"] == 0
    assert replica.attributes["gen_ai.request.model"] == r.model == replica.name.split(" ", 1)[1]
    assert replica.attributes["dgserve.replica"] == r.replica
    # one span per canvas: steps, tokens accepted per step, why it committed, placed in the replica's span
    assert [c.attributes["dgserve.canvas.steps"] for c in canvases] == list(r.denoising.steps_per_canvas)
    for c in canvases:
        assert len(c.attributes["dgserve.canvas.accepted_per_step"]) == c.attributes["dgserve.canvas.steps"]
        assert c.attributes["dgserve.canvas.converged_by"] in ("stable", "step_cap")
        assert replica.start_ns <= c.start_ns < c.end_ns <= replica.end_ns
    assert canvases[0].end_ns <= canvases[1].start_ns


def test_client_traceparent_is_continued_through_a_stream(client, receiver, sent):
    tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    call = client.stream(make_request("Trace me", max_new_tokens=8, seed=2, request_id="traced-1"),
                         metadata=[("traceparent", f"00-{tid}-{sid}-01")], timeout=120)
    final = list(call)[-1]
    assert final.finished
    sent.answers[("diffusion", "OK")] += 1
    sent.diffusion_tokens += final.usage.completion_tokens
    sent.canvases += final.denoising.canvases
    spans = _whole_trace(receiver, "traced-1", lambda t: any(s.name.startswith("text_completion") for s in t)
                         and any(s.name == telemetry.CANVAS_SPAN for s in t))
    router = _router_span(spans, "traced-1")
    assert router.trace_id == tid and router.parent_id == sid  # the client's span is the router span's parent
    assert router.name == "dgserve.v1.DGServe/GenerateStream" and router.attributes["gen_ai.request.stream"] is True
    replica = _one(spans, name_prefix="text_completion ")
    assert replica.trace_id == tid and replica.parent_id == router.span_id


def _diffusion_backend(info: pb.ModelInfo) -> pb.BackendInfo:
    return next(b for b in info.backends if b.backend == DIFF)


def _wait(condition, timeout_s: float = 30.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what or condition} not true within {timeout_s}s")
        time.sleep(0.1)


class _FullReplicas:
    """Hold every diffusion slot with long DIFFUSION_ONLY requests (early stopping off) until exit."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __enter__(self):
        req = make_request("fill", max_new_tokens=64, max_denoising_steps=4096, confidence_threshold=0.0,
                           routing="diffusion")
        self.calls = [self.client.stub.Generate.future(req, timeout=180) for _ in range(CAP)]
        _wait(lambda: (b := _diffusion_backend(self.client.info())).router_in_flight == b.router_capacity == CAP,
              60, "diffusion slots all taken")
        return self

    def __exit__(self, *exc):
        for c in self.calls:
            c.cancel()
        _wait(lambda: _diffusion_backend(self.client.info()).router_in_flight == 0, 60, "slots freed")


def test_an_overflowed_request_shows_the_route_and_the_fallback_span(client, receiver, sent):
    with _FullReplicas(client):
        r = sent.ok(client.generate(make_request("Overflow me", max_new_tokens=6, request_id="over-1"),
                                    timeout=120), overflow=True)
    assert r.backend == AR
    spans = _whole_trace(receiver, "over-1", lambda t: any(s.name.startswith("text_completion") for s in t)
                         and any(s.name == telemetry.ROUTE_SPAN for s in t))
    router = _router_span(spans, "over-1")
    route = _one(spans, name=telemetry.ROUTE_SPAN)
    fallback = _one(spans, name=f"text_completion {FALLBACK_MODEL}")
    assert route.attributes["dgserve.routing.reason"] == "overflow"
    assert route.attributes["dgserve.backend"] == "autoregressive"
    assert route.attributes["dgserve.routing.diffusion.slots_in_use"] == route.attributes[
        "dgserve.routing.diffusion.slots"] == CAP
    assert fallback.parent_id == router.span_id and fallback.trace_id == router.trace_id
    assert fallback.attributes["dgserve.backend"] == "autoregressive"
    assert fallback.attributes["gen_ai.usage.output_tokens"] == r.usage.completion_tokens
    assert not any(s.name == telemetry.CANVAS_SPAN for s in spans)
    assert router.attributes["dgserve.backend"] == "autoregressive"


def test_start_up_context_verification_spans(client, receiver):
    def startup(spans):
        got = {(s.attributes["dgserve.component"], s.attributes["dgserve.backend"]): s for s in spans
               if s.name == telemetry.STARTUP_SPAN and s.resource.get("service.name") == "dgserve"
               and s.attributes.get("dgserve.component") in ("router", "diffusion", "fallback")}
        return got if len(got) >= 4 else None
    got = receiver.wait_for(startup, 30)
    for key in [("router", "diffusion"), ("router", "autoregressive"), ("diffusion", "diffusion"),
                ("fallback", "autoregressive")]:
        s = got[key]
        assert s.attributes["dgserve.context.verified"] is True, key
        assert s.attributes["dgserve.context.served"] >= s.attributes["dgserve.context.promised"] == 2048, key
        assert s.parent_id == "" and s.status_code != 2
    assert got[("diffusion", "diffusion")].attributes["dgserve.context.requested"] == 2048


# --- metrics -----------------------------------------------------------------------------------------

def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
    """This app's samples from Ray's metrics agent: series name -> [(labels, value)]."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("application") == APP and s.name.startswith("ray_dgserve_"):
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def _scrape_when(condition, timeout_s: float = 60.0, what: str = ""):
    last = {}

    def check():
        nonlocal last
        last = scrape()
        return last if condition(last) else None
    try:
        return _wait(check, timeout_s, what)
    except TimeoutError as e:
        summary = {k: [(lab.get("backend"), lab.get("code"), v) for lab, v in vals] for k, vals in last.items()
                   if "bucket" not in k}
        raise AssertionError(f"{e}; last scrape: {summary}") from None


def test_metrics_exist_and_move_overflow_only_when_replicas_are_full(client, sent):
    # a small load while the replicas have room: sequential requests never overflow
    for i in range(3):
        sent.ok(client.generate(make_request(f"room {i}", max_new_tokens=24, seed=i), timeout=120))
    with pytest.raises(grpc.RpcError) as err:
        client.generate(make_request(""))  # refused before routing
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    sent.answers[("none", "INVALID_ARGUMENT")] += 1
    ok_diffusion = sent.answers[("diffusion", "OK")]
    m = _scrape_when(lambda m: total(m, "ray_dgserve_router_requests_total", backend="diffusion", code="OK")
                     >= ok_diffusion and total(m, "ray_dgserve_router_requests_total", backend="none") >= 1,
                     what="the router's answers exported")
    for (backend, code), n in sent.answers.items():
        assert total(m, "ray_dgserve_router_requests_total", backend=backend, code=code) == n, (backend, code)
    assert total(m, "ray_dgserve_router_overflow_total") == sent.overflowed  # no rise while replicas had room
    before_overflow = sent.overflowed

    # replicas full: ANY requests overflow, and only they count
    with _FullReplicas(client):
        for i in range(2):
            r = sent.ok(client.generate(make_request(f"full {i}", max_new_tokens=6), timeout=120), overflow=True)
            assert r.backend == AR
    assert sent.overflowed == before_overflow + 2
    m = _scrape_when(lambda m: total(m, "ray_dgserve_router_overflow_total") >= sent.overflowed
                     and total(m, "ray_dgserve_router_requests_total", backend="diffusion", code="CANCELLED") >= 2
                     and total(m, "ray_dgserve_generated_tokens_total", deployment="AutoregressiveFallback")
                     >= sent.fallback_tokens, what="overflow exported")
    assert total(m, "ray_dgserve_router_overflow_total") == sent.overflowed
    assert total(m, "ray_dgserve_router_requests_total", backend="autoregressive", code="OK") == \
        sent.answers[("autoregressive", "OK")]

    # every documented metric exists
    missing = [n for spec in telemetry.METRICS for n in telemetry.prometheus_names(spec) if n not in m]
    assert not missing, missing

    # ... and says what happened
    for backend in ("diffusion", "autoregressive"):
        assert total(m, "ray_dgserve_router_request_seconds_count", backend=backend, code="OK") == \
            total(m, "ray_dgserve_router_requests_total", backend=backend, code="OK")
    # the fill requests waited in no queue but could only run on diffusion; ANY requests got a slot at once
    assert total(m, "ray_dgserve_router_queue_wait_seconds_count", routing="diffusion_only") >= 4
    assert total(m, "ray_dgserve_router_queue_wait_seconds_count", routing="any") >= sum(sent.answers.values()) - 2
    assert total(m, "ray_dgserve_router_slots", backend="diffusion") == CAP
    assert total(m, "ray_dgserve_router_queue_length") == 0
    assert total(m, "ray_dgserve_context_promised_tokens") == 2048
    assert total(m, "ray_dgserve_context_served_tokens", backend="diffusion") >= 2048
    assert total(m, "ray_dgserve_context_served_tokens", backend="autoregressive", model=FALLBACK_MODEL) == 2048
    # batch sizes: the fills ran two at once on the one replica
    admitted = total(m, "ray_dgserve_replica_batch_size_count", deployment="DiffusionReplica")
    alone = total(m, "ray_dgserve_replica_batch_size_bucket", deployment="DiffusionReplica", le="1.0")
    assert admitted >= sent.answers[("diffusion", "OK")] + 4 and 0 < alone < admitted
    assert total(m, "ray_dgserve_replica_batch_size_bucket", deployment="DiffusionReplica", le="2.0") == admitted
    assert total(m, "ray_dgserve_replica_in_flight", deployment="DiffusionReplica") >= 0
    # diffusion: canvases, steps, tokens
    assert total(m, "ray_dgserve_canvas_steps_count") >= sent.canvases
    assert {lab["converged_by"] for lab, _ in m["ray_dgserve_canvas_steps_count"]} <= {"stable", "step_cap"}
    assert total(m, "ray_dgserve_canvas_tokens_per_step_count") == total(m, "ray_dgserve_canvas_steps_count")
    assert total(m, "ray_dgserve_time_to_first_canvas_seconds_count") >= sent.answers[("diffusion", "OK")]
    assert total(m, "ray_dgserve_generated_tokens_total", deployment="DiffusionReplica") >= sent.diffusion_tokens
