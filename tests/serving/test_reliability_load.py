"""Soak and faults on the real stack: front (plaintext, explicitly allowed) -> Serve's gRPC proxy -> Router ->
2 DiffusionReplicas capped at 4 (real engine, tiny random checkpoint, 1 denoising step) + the SmolLM2
fallback (16 slots), loaded with ``dgserve.loadtest`` (the same harness ``dgserve loadtest`` runs).

* soak: 2,000 requests at concurrency 64 (short, long, streaming and diffusion-only requests): every
  request ends in success or an explicit, documented gRPC error and the counts add up exactly (also
  against the replicas' own request counters: nothing lost, nothing run twice); no replica ever ran
  more than its cap (measured inside each replica at every admission);
* a diffusion replica killed mid-load: its requests are retried on the other replica or fail promptly
  with UNAVAILABLE (none waits for its deadline), Serve starts a replacement and traffic reaches it;
* the fallback killed mid-load: ANY requests are served by the diffusion replicas or refused with
  RESOURCE_EXHAUSTED, none hangs; the fallback comes back;
* the router killed: calls fail fast (UNAVAILABLE) while Serve restarts it, then the same client
  channels work again (no reconnect logic needed in clients); a request the dead router had in flight
  is stopped by its replica at the client's deadline, which travelled with it.

Everything runs on loopback, in bounded counts and times; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
import pytest
from reliability_testlib import call, front_stack, wait_idle
from serving_testlib import app_config

from dgserve.loadtest.harness import Kind, Mix, Target, default_kinds, run_level_async
from dgserve.loadtest.report import summarize
from dgserve.serving.client import make_request
from dgserve.serving.local import free_port
from dgserve.v1 import dgserve_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CAP, REPLICAS, FALLBACK_SLOTS = 4, 2, 16
DIFF, AR = pb.BACKEND_DIFFUSION, pb.BACKEND_AUTOREGRESSIVE
SOAK_REQUESTS, SOAK_CONCURRENCY = 2000, 64
KINDS = default_kinds(short=4, long=16, steps=1)
SOAK_MIX = Mix(((KINDS["short"], 4), (KINDS["long"], 1), (KINDS["stream"], 2), (KINDS["diffusion"], 1)))
OVERLOAD_CODES = {"OK", "RESOURCE_EXHAUSTED"}  # what an overloaded but healthy stack may answer
QUEUE_TIMEOUT_S = 10.0
DEADLINE_S = 40.0  # per request in the fault tests: well past queue wait + generation
ORPHAN_DEADLINE_S = 20.0  # the request in flight when the router is killed


@pytest.fixture(scope="module")
def stack(tiny_model, serve_port):
    cfg = app_config(
        tiny_model, free_port(),
        diffusion={"num_replicas": REPLICAS, "engine": {"max_batch": CAP, "max_denoising_steps": 1},
                   "health_check_period_s": 1.0, "health_check_timeout_s": 10.0},
        fallback={"max_batch": FALLBACK_SLOTS, "default_max_new_tokens": 4, "health_check_period_s": 2.0},
        router={"queue_size": 64, "queue_timeout_s": QUEUE_TIMEOUT_S},
        security={"allow_plaintext": True, "proxy_port": serve_port,
                  "limits": {"max_concurrent_per_client": None}})
    with front_stack(cfg, serve_port) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    with stack.client() as c:
        yield c


def backend(info: pb.ModelInfo, which: int) -> pb.BackendInfo:
    (b,) = [b for b in info.backends if b.backend == which]
    return b


def requests_served(client) -> dict[str, int]:
    """Each replica's own count of requests it admitted (ReplicaStats.requests)."""
    info = client.info()
    return {r.replica: r.requests for b in info.backends for r in b.replicas}


def until(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(every_s)


def healthy_replicas(client, which: int) -> set[str]:
    try:
        return {r.replica for r in backend(client.info(timeout=5), which).replicas if r.healthy}
    except grpc.RpcError:
        return set()


class Load:
    """Background closed-loop load (``dgserve.loadtest``) on its own thread: ``records`` once joined."""

    def __init__(self, stack, concurrency: int, mix: Mix, requests: int, timeout_s: float = DEADLINE_S):
        self.records = None
        target = Target(stack.target, timeout_s=timeout_s)
        self.thread = threading.Thread(target=lambda: setattr(self, "records", asyncio.run(
            run_level_async(target, concurrency, mix, requests=requests))), daemon=True)
        self.started = time.monotonic()
        self.thread.start()

    def join(self, timeout_s: float):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"load did not finish within {timeout_s}s: a request hangs"
        return self.records


def kill_replica(app: str, deployment: str, replica: str | None = None) -> str:
    """``ray.kill`` one replica actor of ``deployment`` (a crash: no graceful shutdown); returns its id."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(prefix) and (replica is None or a["name"].endswith(replica)))
    assert names, f"no live {deployment} replica"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0].rsplit("#", 1)[-1]


# --- soak ------------------------------------------------------------------------------------------------

def test_soak_2000_requests_at_concurrency_64(stack, client):
    before = requests_served(client)
    t0 = time.monotonic()
    records = asyncio.run(run_level_async(Target(stack.target, timeout_s=120), SOAK_CONCURRENCY, SOAK_MIX,
                                          requests=SOAK_REQUESTS, seed=8))
    seconds = time.monotonic() - t0
    row = summarize(records)
    print(f"\nsoak: {row}")
    codes = Counter(r.code for r in records)
    # every request ended, exactly once, in success or an explicit documented error
    assert len(records) == SOAK_REQUESTS and sum(codes.values()) == SOAK_REQUESTS
    assert set(codes) <= OVERLOAD_CODES, codes
    assert all(r.details for r in records if r.code != "OK")
    ok = [r for r in records if r.code == "OK"]
    # nothing lost or run twice: the replicas admitted exactly the requests that succeeded
    after = requests_served(client)
    admitted = sum(after.get(k, 0) - before.get(k, 0) for k in after)
    assert admitted == len(ok), (admitted, len(ok), codes)
    # no diffusion replica above its cap, measured inside the replica at every admission
    assert max(r.replica_in_flight for r in ok if r.backend == "diffusion") <= CAP
    info = wait_idle(client)
    assert all(r.peak_in_flight <= CAP for r in backend(info, DIFF).replicas)
    assert all(r.peak_in_flight <= FALLBACK_SLOTS for r in backend(info, AR).replicas)
    kinds = Counter(r.kind for r in ok)
    assert set(kinds) == {"short", "long", "stream", "diffusion"}
    assert all(r.backend == "diffusion" for r in ok if r.kind == "diffusion")
    assert {r.backend for r in ok} == {"diffusion", "autoregressive"}  # the overflow went to the fallback
    streams = [r for r in ok if r.kind == "stream" and r.tokens > 0]  # (a random model may stop at once)
    assert streams and all(r.ttfc_s is not None and r.ttfc_s <= r.latency_s for r in streams)
    assert seconds < 400


# --- faults ------------------------------------------------------------------------------------------------

def test_diffusion_replica_killed_mid_load(stack, client):
    before = healthy_replicas(client, DIFF)
    assert len(before) == REPLICAS
    mix = Mix(((Kind("d", 8, routing="diffusion", max_denoising_steps=2), 1),))
    load = Load(stack, 12, mix, 240)
    until(lambda: sum(r.engine_in_flight for r in backend(client.info(), DIFF).replicas) >= 4, 20, "load running")
    killed_at = time.monotonic()
    victim = kill_replica(stack.config.name, "DiffusionReplica")
    records = load.join(120)
    codes = Counter(r.code for r in records)
    print(f"\nreplica {victim} killed: {dict(codes)}")
    assert len(records) == 240 and set(codes) <= {"OK", "UNAVAILABLE"}, codes
    for r in records:  # none hung: a failure came promptly after the kill, never at the deadline
        if r.code == "UNAVAILABLE":
            ended = load.started + r.start_s + r.latency_s
            assert ended - killed_at < 10 and r.latency_s < DEADLINE_S / 2, r
            assert "died" in r.details, r.details
    served_by = Counter(r.replica for r in records if r.code == "OK")
    # Serve replaces the replica; the router gives the new one slots and traffic reaches it
    def replaced():
        h = healthy_replicas(client, DIFF)
        return h if len(h) == REPLICAS and victim not in h else None

    now = until(replaced, 90, "replacement replica healthy")
    new = (now - before).pop()
    until(lambda: backend(client.info(), DIFF).router_capacity == REPLICAS * CAP, 10, "router capacity restored")
    records = asyncio.run(run_level_async(Target(stack.target, timeout_s=60), 2 * CAP * REPLICAS, mix, requests=48))
    assert {r.code for r in records} == {"OK"}
    assert new in {r.replica for r in records}, (new, Counter(r.replica for r in records))
    assert victim in served_by or served_by  # the victim was serving before it died


def test_fallback_killed_mid_load(stack, client):
    before = healthy_replicas(client, AR)
    assert len(before) == 1
    mix = Mix(((Kind("any", 4, max_denoising_steps=1), 1),))
    load = Load(stack, 28, mix, 280)  # more than the 8 diffusion slots: the fallback takes the overflow
    until(lambda: backend(client.info(), AR).router_in_flight > 0, 30, "overflow reaching the fallback")
    killed_at = time.monotonic()
    victim = kill_replica(stack.config.name, "AutoregressiveFallback")
    records = load.join(120)
    codes = Counter(r.code for r in records)
    print(f"\nfallback {victim} killed: {dict(codes)}")
    assert len(records) == 280 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, codes
    unavailable = [r for r in records if r.code == "UNAVAILABLE"]
    # only requests that were on the fallback when it died may fail so, and promptly
    assert len(unavailable) <= FALLBACK_SLOTS
    assert all(load.started + r.start_s + r.latency_s - killed_at < 10 for r in unavailable)
    assert all(r.latency_s < QUEUE_TIMEOUT_S + 10 for r in records)  # nothing waited past the queue timeout
    after_kill = [r for r in records if r.code == "OK" and load.started + r.start_s > killed_at + 1]
    assert after_kill and all(r.backend in ("diffusion", "autoregressive") for r in after_kill)
    assert any(r.backend == "diffusion" for r in after_kill)  # diffusion kept serving ANY requests
    until(lambda: (h := healthy_replicas(client, AR)) and victim not in h, 120, "fallback replaced")
    r = client.generate(make_request("back?", max_new_tokens=2, routing="autoregressive"), timeout=60)
    assert r.backend == AR and r.replica != victim


def test_router_restart_clients_reconnect(stack, client):
    """The same client channel works again once Serve has restarted the router; meanwhile calls fail fast."""
    assert client.generate(make_request("before", max_new_tokens=2), timeout=30).backend in (DIFF, AR)
    sent = time.monotonic()
    held = client.stream(make_request("in flight", max_new_tokens=64, max_denoising_steps=4096,  # minutes of work
                                      confidence_threshold=0.0, routing="diffusion", stream_drafts=True),
                         timeout=ORPHAN_DEADLINE_S)
    next(iter(held))  # a draft: the request runs on a replica, through the router
    killed_at = time.monotonic()
    kill_replica(stack.config.name, "Router")
    _, err = call(lambda: list(held))
    # Serve's proxy says INTERNAL "The actor died unexpectedly" (with pid and actor id); the front: UNAVAILABLE
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert "retry" in err.details() and "pid" not in err.details() and time.monotonic() - killed_at < 15
    assert stack.front.call(lambda: stack.front.front.remapped.get("INTERNAL", 0)) >= 1
    outage: Counter = Counter()

    def ok() -> bool:
        _, e = call(client.generate, make_request("after", max_new_tokens=2), timeout=10)
        if e is not None:
            outage[e.code().name] += 1
        return e is None

    until(ok, 120, "router back", every_s=0.5)
    print(f"\nrouter restarted after {time.monotonic() - killed_at:.1f}s; meanwhile: {dict(outage)}")
    assert set(outage) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, outage
    assert client.health() == "SERVING"
    # The replica never learns that the router died (Ray does not cancel a call whose caller died), but the
    # client's deadline travelled with the request (front -> dgserve-timeout-ms -> router -> timeout_s), so the
    # replica stops it there itself instead of running 2 canvases x 4096 steps: idle by deadline + slack.
    idle = wait_idle(client, timeout_s=max(2.0, sent + ORPHAN_DEADLINE_S + 10 - time.monotonic()))
    assert all(r.in_flight == 0 and r.engine_in_flight <= 0 for b in idle.backends for r in b.replicas), idle
    print(f"orphaned request gone {time.monotonic() - sent:.1f}s after it was sent (deadline {ORPHAN_DEADLINE_S}s)")
