"""Router request handling without Ray: backends are stand-in handles (doubles of Serve's
DeploymentHandle: ``.generate_unary.remote(req)`` awaitable, ``.options(stream=True).generate.remote``
async iterable), so slot accounting, retries and status codes are checked alone."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dgserve.serving.client import make_request
from dgserve.serving.config import AppConfig
from dgserve.serving.messages import TIMEOUT_METADATA, Chunk, Failure, Final
from dgserve.serving.router import DIFFUSION, FALLBACK, Router
from dgserve.serving.slots import Admission
from dgserve.v1 import dgserve_pb2 as pb

FINAL = Final(finish_reason="length", prompt_tokens=3, completion_tokens=2, model="m", backend="diffusion",
              replica="r2", replica_in_flight=1, first_chunk_s=0.01, seconds=0.02, steps_per_canvas=(4,),
              tokens_per_step=0.5)


class _Call:
    def __init__(self, result):
        self.result, self.cancelled = result, False

    def __await__(self):
        async def run():
            if isinstance(self.result, BaseException):
                raise self.result
            return self.result
        return run().__await__()

    def cancel(self):
        self.cancelled = True


class _Stream:
    def __init__(self, events):
        self.events, self.cancelled = events, False

    def __aiter__(self):
        async def gen():
            for ev in self.events:
                yield ev
        return gen()

    def cancel(self):
        self.cancelled = True


class _Handle:
    """Answers each call with the next scripted reply."""

    def __init__(self, replies):
        self.replies, self.calls, self.requests = list(replies), 0, []
        self.generate_unary = self
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, req):
        self.calls += 1
        self.requests.append(req)
        reply = self.replies.pop(0)
        return _Stream(reply[1:]) if isinstance(reply, list) and reply and reply[0] == "stream" else _Call(reply)


class _Ctx:
    def __init__(self, metadata=()):
        self.code, self.details, self.trailers, self.metadata = None, "", [], tuple(metadata)

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, md):
        self.trailers = md


class _NoMetrics:
    """Stands in for RouterMetrics (Ray metrics need a Ray worker): every recording is a no-op."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def make_router(diffusion, fallback=None, slots=1, queue=0) -> Router:
    r = object.__new__(Router)  # no Serve context: wire the parts by hand
    r.cfg = AppConfig.model_validate({"promised_context_length": 64, "diffusion": {"engine": {"model": "m"}},
                                      "router": {"queue_size": queue, "queue_timeout_s": 0.2}})
    r.handles = {DIFFUSION: diffusion} | ({FALLBACK: fallback} if fallback else {})
    r.admission = Admission(tuple(r.handles), queue)
    for b in r.handles:
        r.admission.set_capacity(b, slots)
    r._metrics = _NoMetrics()
    r.refreshes = 0

    async def refresh():
        r.refreshes += 1
    r.refresh = refresh
    return r


def test_a_request_whose_replica_died_is_retried_once():
    died = [Failure("UNAVAILABLE", "backend engine died: engine loop died")]
    ok = [Chunk(0, "hi", (5, 6), 4), FINAL]
    d = _Handle([died, ok])
    router, ctx = make_router(d), _Ctx()
    resp = asyncio.run(router.Generate(make_request("x"), ctx))
    assert ctx.code is None and resp.text == "hi" and resp.replica == "r2" and d.calls == 2
    assert router.refreshes == 1 and router.admission.in_use(DIFFUSION) == 0


def test_a_second_death_and_a_request_error_are_not_retried():
    died = [Failure("UNAVAILABLE", "engine died")]
    router, ctx = make_router(_Handle([died, died])), _Ctx()
    asyncio.run(router.Generate(make_request("x"), ctx))
    assert ctx.code == grpc.StatusCode.UNAVAILABLE
    h = _Handle([[Failure("OUT_OF_RANGE", "prompt of 99 tokens exceeds 64")]])
    router, ctx = make_router(h), _Ctx()
    asyncio.run(router.Generate(make_request("x"), ctx))
    assert ctx.code == grpc.StatusCode.OUT_OF_RANGE and "exceeds 64" in ctx.details and h.calls == 1
    assert router.admission.in_use(DIFFUSION) == 0


def test_full_backends_answer_resource_exhausted_with_retry_trailers():
    router, ctx = make_router(_Handle([]), slots=0, queue=0), _Ctx()
    resp = asyncio.run(router.Generate(make_request("x", routing="diffusion"), ctx))
    assert resp == pb.GenerateResponse() and ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after-ms", "1000") in ctx.trailers and ("grpc-retry-pushback-ms", "1000") in ctx.trailers


def test_any_overflows_to_the_fallback_when_diffusion_is_full():
    fb_final = Final(finish_reason="stop", prompt_tokens=1, completion_tokens=1, model="smol",
                     backend="autoregressive", replica="f1", replica_in_flight=1, first_chunk_s=0.0, seconds=0.0)
    router = make_router(_Handle([]), _Handle([[Chunk(0, "ok", (1,)), fb_final]]))
    router.admission.set_capacity(DIFFUSION, 0)
    resp = asyncio.run(router.Generate(make_request("x"), _Ctx()))
    assert resp.backend == pb.BACKEND_AUTOREGRESSIVE and resp.text == "ok"


def test_stream_retries_only_before_anything_was_sent():
    died = ["stream", Failure("UNAVAILABLE", "engine died")]
    ok = ["stream", Chunk(0, "a", (1,)), FINAL]
    router = make_router(_Handle([died, ok]))

    async def collect(req):
        return [m async for m in router.GenerateStream(req, _Ctx())]

    msgs = asyncio.run(collect(make_request("x")))
    assert [m.chunk.text for m in msgs if m.WhichOneof("event") == "chunk"] == ["a"] and msgs[-1].finished
    late = ["stream", Chunk(0, "a", (1,)), Failure("UNAVAILABLE", "engine died")]
    router = make_router(_Handle([late, ok]))
    with pytest.raises(Exception):
        asyncio.run(collect(make_request("x")))
    assert router.handles[DIFFUSION].calls == 1 and router.admission.in_use(DIFFUSION) == 0


def test_the_client_deadline_travels_to_the_backend_as_seconds_left():
    h = _Handle([[Chunk(0, "hi", (5,), 4), FINAL], ["stream", Chunk(0, "a", (1,)), FINAL], [FINAL]])
    router = make_router(h)
    asyncio.run(router.Generate(make_request("x"), _Ctx([(TIMEOUT_METADATA, "5000")])))

    async def collect():
        return [m async for m in router.GenerateStream(make_request("x"), _Ctx([(TIMEOUT_METADATA, "8000")]))]

    assert asyncio.run(collect())[-1].finished
    asyncio.run(router.Generate(make_request("x"), _Ctx()))  # no deadline: none is invented
    unary, stream, none = (r.timeout_s for r in h.requests)
    assert 4.0 < unary <= 5.0 and 7.0 < stream <= 8.0 and none is None


@pytest.mark.parametrize("value", ["soon", "-5", "1.5"])
def test_a_malformed_deadline_header_is_refused_by_name(value):
    h = _Handle([[FINAL]])
    router, ctx = make_router(h), _Ctx([(TIMEOUT_METADATA, value)])
    asyncio.run(router.Generate(make_request("x"), ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(value) in ctx.details and TIMEOUT_METADATA in ctx.details
    assert h.calls == 0


def test_a_deadline_that_passed_before_dispatch_is_deadline_exceeded_and_frees_the_slot():
    h = _Handle([[FINAL]])
    router, ctx = make_router(h), _Ctx([(TIMEOUT_METADATA, "0")])
    asyncio.run(router.Generate(make_request("x"), ctx))
    assert ctx.code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in ctx.details
    assert h.calls == 0 and router.admission.in_use(DIFFUSION) == 0
