"""End to end on a real local Ray Serve: gRPC over loopback -> Router -> DiffusionReplica (real engine,
tiny random checkpoint) or AutoregressiveFallback (real SmolLM2-135M-Instruct, tiny outputs).

One app for this module: 2 diffusion replicas capped at 4, a fallback with 16 slots, a queue of 8.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from dgserve.serving.client import Client, make_request, retry_after_ms
from dgserve.v1 import dgserve_pb2 as pb

from serving_testlib import app_config, deployed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DIFF, AR = pb.BACKEND_DIFFUSION, pb.BACKEND_AUTOREGRESSIVE
CAP, REPLICAS = 4, 2


@pytest.fixture(scope="module")
def client(tiny_model, serve_port):
    cfg = app_config(tiny_model, serve_port, diffusion={"num_replicas": REPLICAS, "engine": {"max_batch": CAP}})
    with deployed(cfg) as c:
        yield c


def slow(prompt: str, steps: int = 4096, **kw) -> pb.GenerateRequest:
    """A request that runs at least ``steps`` denoising steps (early stopping off), whatever the random
    model writes (an early EOS only ends it after the first canvas commits)."""
    return make_request(prompt, max_new_tokens=64, max_denoising_steps=steps, confidence_threshold=0.0,
                        routing="diffusion", **kw)


def _call(client: Client, req: pb.GenerateRequest, timeout: float = 120.0, metadata=()):
    """(response, None) or (None, RpcError)."""
    try:
        return client.generate(req, timeout=timeout, metadata=metadata), None
    except grpc.RpcError as e:
        return None, e


def _burst(client: Client, reqs: list[pb.GenerateRequest], timeout: float = 120.0):
    """Send every request at the same moment from its own thread."""
    barrier = threading.Barrier(len(reqs))

    def one(req):
        barrier.wait()
        return _call(client, req, timeout)

    with ThreadPoolExecutor(len(reqs)) as pool:
        return list(pool.map(one, reqs))


def _replicas(client: Client, backend: int) -> list[pb.ReplicaStats]:
    (b,) = [b for b in client.info().backends if b.backend == backend]
    return list(b.replicas)


def _wait_idle(client: Client, timeout_s: float = 15.0) -> list[pb.ReplicaStats]:
    deadline = time.monotonic() + timeout_s
    while True:
        reps = _replicas(client, DIFF)
        if all(r.in_flight == 0 and r.engine_in_flight == 0 for r in reps) or time.monotonic() > deadline:
            return reps
        time.sleep(0.1)


def test_unary_prompt_and_chat(client):
    r = client.generate(make_request("Hello", max_new_tokens=40, seed=1))
    assert r.backend == DIFF and r.replica and r.model
    assert r.usage.completion_tokens == len(r.token_ids) > 0
    assert r.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert r.denoising.canvases == len(r.denoising.steps_per_canvas) >= 1
    assert r.timings.total_ms >= r.timings.first_chunk_ms > 0
    chat = client.generate(make_request(messages=[("user", "Hi there")], max_new_tokens=8, seed=1))
    assert chat.backend == DIFF and chat.usage.prompt_tokens > r.usage.prompt_tokens  # the chat template wraps it
    ar = client.generate(make_request(messages=[("user", "What is 2+2?")], max_new_tokens=6,
                                      routing="autoregressive"))
    assert ar.backend == AR and ar.model == "SmolLM2-135M-Instruct" and ar.text and 0 < len(ar.token_ids) <= 6


def test_stream_one_message_per_canvas_and_drafts(client):
    req = make_request("Once upon a time", max_new_tokens=96, seed=3, stream_drafts=True)
    msgs = list(client.stream(req))
    chunks = [m for m in msgs if m.WhichOneof("event") == "chunk"]
    drafts = [m for m in msgs if m.WhichOneof("event") == "draft"]
    final = msgs[-1]
    assert final.finished and not any(m.finished for m in msgs[:-1])
    assert len(chunks) == final.denoising.canvases >= 1 and drafts
    assert [c.chunk.index for c in chunks] == list(range(len(chunks)))
    # same seed, same output, whether streamed or not and whatever replica serves it
    unary = client.generate(make_request("Once upon a time", max_new_tokens=96, seed=3))
    assert [t for c in chunks for t in c.chunk.token_ids] == list(unary.token_ids)
    assert "".join(c.chunk.text for c in chunks) == unary.text


def test_model_info_and_health(client):
    info = client.info()
    assert info.api_version == "dgserve.v1" and info.promised_context_length == 2048
    assert info.served_context_length >= 2048 and info.max_batch == CAP and info.canvas_length == 32
    backends = {b.backend: b for b in info.backends}
    assert backends[DIFF].running_replicas == REPLICAS and backends[DIFF].router_capacity == REPLICAS * CAP
    assert backends[AR].served_context_length == 2048 and backends[AR].kind == "smollm2"
    assert client.health() == "SERVING" and client.health("dgserve.v1.DGServe") == "SERVING"
    with pytest.raises(grpc.RpcError) as err:
        client.health("no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_24_concurrent_requests_two_replicas_capped_at_4(client):
    before = {r.replica: r.requests for r in _replicas(client, AR)}
    # diffusion requests run >= 48 steps (early stop off) so the burst overlaps; the fallback ignores those knobs
    results = _burst(client, [make_request(f"request {i}", max_new_tokens=24, seed=i, max_denoising_steps=48,
                                           confidence_threshold=0.0) for i in range(24)])
    errors = [e for _, e in results if e is not None]
    assert not errors, [(e.code(), e.details()) for e in errors]
    per_replica: dict[str, int] = defaultdict(int)
    by_backend: dict[int, int] = defaultdict(int)
    for r, _ in results:
        by_backend[r.backend] += 1
        if r.backend == DIFF:
            per_replica[r.replica] = max(per_replica[r.replica], r.replica_in_flight)
    # measured inside each replica, at every admission
    assert max(per_replica.values()) <= CAP, per_replica
    assert all(r.peak_in_flight <= CAP for r in _replicas(client, DIFF))
    assert by_backend[DIFF] >= REPLICAS * CAP and by_backend[AR] >= 1, by_backend  # the overflow went to the fallback
    after = {r.replica: r.requests for r in _replicas(client, AR)}
    assert sum(after.values()) - sum(before.values()) == by_backend[AR]


def test_diffusion_only_never_reaches_the_fallback(client):
    before = sum(r.requests for r in _replicas(client, AR))
    results = _burst(client, [make_request(f"pinned {i}", max_new_tokens=64, seed=i, routing="diffusion")
                              for i in range(16)])  # 8 run, 8 wait in the queue
    assert all(e is None for _, e in results), [e.details() for _, e in results if e]
    assert {r.backend for r, _ in results} == {DIFF}
    assert max(r.timings.queue_ms for r, _ in results) > 0
    assert sum(r.requests for r in _replicas(client, AR)) == before


def test_full_queue_answers_resource_exhausted_with_a_retry_hint(client):
    before = sum(r.requests for r in _replicas(client, AR))
    results = _burst(client, [slow(f"long {i}", steps=48) for i in range(22)])
    served = [r for r, e in results if e is None]
    refused = [e for _, e in results if e is not None]
    assert {r.backend for r in served} == {DIFF}
    assert len(served) >= REPLICAS * CAP + 8 and refused  # 8 running + 8 queued; the rest refused at once
    for e in refused:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
        assert retry_after_ms(e) == 1000 and "retry after" in e.details()
    assert sum(r.requests for r in _replicas(client, AR)) == before


def test_over_long_prompt_is_out_of_range_never_truncated(client):
    long_prompt = "word " * 2100  # > 2048 tokens for both tokenizers
    for routing in ("any", "diffusion", "autoregressive"):
        _, err = _call(client, make_request(long_prompt, max_new_tokens=8, routing=routing))
        assert err is not None and err.code() == grpc.StatusCode.OUT_OF_RANGE, routing
        assert "2048" in err.details(), err.details()
    with pytest.raises(grpc.RpcError) as e:
        list(client.stream(make_request(long_prompt, max_new_tokens=8)))
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE and "Traceback" not in e.value.details()
    _, err = _call(client, make_request("short", max_new_tokens=2047))  # prompt + max_new_tokens counts
    assert err is not None and err.code() == grpc.StatusCode.OUT_OF_RANGE


@pytest.mark.parametrize("req, match", [
    (make_request(), "empty request"),
    (make_request("x", messages=[("user", "y")]), "not both"),
    (make_request("x", pinned=[(500, 5)], max_new_tokens=16), "pinned position 500"),
    (make_request("x", pinned=[(0, 99999)], max_new_tokens=16), "outside the vocabulary"),
    (make_request("x", entropy_bound=-1.0), "entropy_bound"),
    (make_request("x", routing="autoregressive", infill=("a", "b")), "AUTOREGRESSIVE_ONLY"),
])
def test_bad_requests_are_invalid_argument(client, req, match):
    _, err = _call(client, req)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err and err.details()
    assert match in err.details()
    assert "Traceback" not in err.details()


def test_pinned_positions_and_infill(client):
    r = client.generate(make_request("x", max_new_tokens=40, seed=5, pinned=[(0, 70), (33, 71)]))
    assert r.backend == DIFF and r.token_ids[0] == 70
    if len(r.token_ids) > 33:  # unless an EOS ended it earlier
        assert r.token_ids[33] == 71
    r = client.generate(make_request("x", max_new_tokens=20, seed=5, infill=("abc", "XYZ")))
    assert r.backend == DIFF


def test_client_cancellation_frees_the_engine_slot(client):
    calls = [client.stream(slow(f"cancel me {i}", stream_drafts=True), timeout=120) for i in range(REPLICAS * CAP)]
    for call in calls:
        next(iter(call))  # it is running on a replica
    deadline = time.monotonic() + 10  # the router re-reads replica stats every 0.25 s
    while sum(r.engine_in_flight for r in _replicas(client, DIFF)) < REPLICAS * CAP:
        assert time.monotonic() < deadline, _replicas(client, DIFF)
        time.sleep(0.05)
    # every slot is taken: a DIFFUSION_ONLY request waits in the queue, and its deadline is honoured there
    _, err = _call(client, make_request("queued", max_new_tokens=8, routing="diffusion"), timeout=1.0)
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while client.info().queued and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.info().queued == 0  # it left the queue
    for call in calls:
        call.cancel()
    idle = _wait_idle(client)
    assert all(r.in_flight == 0 and r.engine_in_flight == 0 for r in idle), idle
    r = client.generate(make_request("after", max_new_tokens=8, routing="diffusion"), timeout=30)
    assert r.backend == DIFF and r.replica_in_flight == 1 and r.timings.queue_ms < 1000


def test_the_replica_stops_a_request_at_the_deadline_it_carries(client):
    """Calling Serve's proxy directly (no front), a caller may state its deadline in ``dgserve-timeout-ms``;
    the replica itself ends the request there (what still stops it when the router that sent it died)."""
    t0 = time.monotonic()
    _, err = _call(client, slow("bounded"), timeout=120, metadata=[("dgserve-timeout-ms", "1500")])
    took = time.monotonic() - t0
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
    assert "reached its deadline" in err.details() and 1.4 < took < 15, (err.details(), took)
    idle = _wait_idle(client)
    assert all(r.in_flight == 0 and r.engine_in_flight == 0 for r in idle), idle


def test_deadline_exceeded_frees_the_slot(client):
    _, err = _call(client, slow("slow"), timeout=1.0)
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    idle = _wait_idle(client)
    assert all(r.in_flight == 0 and r.engine_in_flight == 0 for r in idle), idle
