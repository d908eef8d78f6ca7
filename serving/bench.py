"""Serving benchmark: the router's added latency and a concurrency sweep with overflow on and off.

    python -m dgserve.serving.bench [--out results.json] [--quick]

Runs a private local Ray Serve (like ``dgserve serve``) with the tiny diffusion checkpoint
(2 replicas capped at 4) and the SmolLM2 fallback (16 slots), then

1. router latency: a tiny request (1 token, 1 denoising step) sent sequentially, alternately through
   the full gRPC path (client -> Serve gRPC proxy -> Router -> DiffusionReplica) and through a direct
   Serve handle call (``generate_unary``) to DiffusionReplica from the driver; p50/p99 of both and their
   difference; and a ``grpc.health.v1`` Check through the proxy to the router (the floor any gRPC call
   through Serve's proxy pays), so the router's own share of the difference can be read off;
2. sweep: closed-loop clients at concurrency 1..64 (ANY routing), once with overflow on and once off:
   throughput, p50/p99 latency, share served by the fallback, most requests any diffusion replica
   ran at once (measured inside the replica at each admission). The load comes from the load
   generator (``dgserve.loadtest``; ``dgserve loadtest`` runs richer sweeps against any deployment).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from dgserve.loadtest.harness import Kind, Mix, Target, run_level
from dgserve.loadtest.report import pct, summarize
from dgserve.v1 import dgserve_pb2 as pb

from . import local
from .client import Client, make_request
from .config import AppConfig
from .messages import BackendRequest, Final

LEVELS = (1, 2, 4, 8, 16, 32, 64)


def bench_config(port: int, overflow: bool) -> AppConfig:
    cpu = {"num_cpus": 0.1}
    return AppConfig.model_validate({
        "promised_context_length": 2048,
        "diffusion": {"engine": {"model": str(local.tiny_model_dir()), "model_name": "tiny-diffusiongemma",
                                 "max_batch": 4, "device": "cpu"}, "num_replicas": 2, "actor_options": cpu},
        "fallback": {"kind": "smollm2", "max_batch": 16, "context_length": 2048, "actor_options": cpu},
        "router": {"grpc_port": port, "overflow": overflow, "queue_size": 64, "queue_timeout_s": 300.0,
                   "capacity_refresh_s": 0.25, "actor_options": cpu},
    })


def router_latency(client: Client, app: str, n: int) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("DiffusionReplica", app)
    greq = make_request("hi", max_new_tokens=1, max_denoising_steps=1, routing="diffusion", seed=0)
    breq = BackendRequest(request_id="x", prompt="hi", max_new_tokens=1, seed=0,
                          sampling={"max_denoising_steps": 1})

    def direct() -> float:
        t0 = time.perf_counter()
        events = handle.generate_unary.remote(breq).result()
        assert isinstance(events[-1], Final), events[-1]
        return time.perf_counter() - t0

    def routed() -> float:
        t0 = time.perf_counter()
        r = client.generate(greq, timeout=30)
        assert r.backend == pb.BACKEND_DIFFUSION
        return time.perf_counter() - t0

    def floor() -> float:  # client -> proxy -> Router.Check and back: no backend call, no routing
        t0 = time.perf_counter()
        assert client.health(timeout=30) == "SERVING"
        return time.perf_counter() - t0

    for _ in range(20):  # warm up every path
        direct()
        routed()
        floor()
    d, r, f = [], [], []
    for _ in range(n):
        d.append(direct())
        r.append(routed())
        f.append(floor())
    ms = lambda xs, q: round(pct(xs, q) * 1e3, 2)  # noqa: E731
    return {"n": n, "direct_p50_ms": ms(d, 50), "direct_p99_ms": ms(d, 99), "router_p50_ms": ms(r, 50),
            "router_p99_ms": ms(r, 99), "added_p50_ms": round(ms(r, 50) - ms(d, 50), 2),
            "added_p99_ms": round(ms(r, 99) - ms(d, 99), 2),
            "proxy_floor_p50_ms": ms(f, 50), "proxy_floor_p99_ms": ms(f, 99),
            # what is left of the added p50 once the gRPC proxy and its hop to the router are taken out
            "router_work_p50_ms": round(ms(r, 50) - ms(d, 50) - ms(f, 50), 2)}


def sweep_level(target: str, concurrency: int, total: int, max_new_tokens: int) -> dict[str, Any]:
    """One closed-loop level of plain-prompt ANY requests (the load generator does the work)."""
    mix = Mix(((Kind("short", max_new_tokens, chat=False), 1),))
    row = summarize(run_level(Target(target, timeout_s=600), concurrency, mix, requests=total))
    return {
        "concurrency": concurrency, "requests": total, "errors": row["errors"], "seconds": round(row["seconds"], 2),
        "req_per_s": round(row["req_per_s"], 2), "tok_per_s": round(row["tok_per_s"], 1),
        "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"], "fallback_share": round(row["share_autoregressive"], 3),
        "max_in_flight_per_replica": row["max_in_flight_per_replica"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="dgserve serving benchmark (router latency, overflow sweep)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--latency-only", action="store_true", help="only the router latency, no sweep")
    args = ap.parse_args(argv)
    port = local.free_port()
    out: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()}, {_cpus()} CPUs, no GPU",
                           "max_new_tokens": args.max_new_tokens}
    local.start_ray()
    try:
        local.start_serve(port)
        target = f"127.0.0.1:{port}"
        for overflow in (True, False):
            cfg = bench_config(port, overflow)
            local.deploy(cfg)
            local.wait_healthy(target, 120)
            with Client(target) as client:
                if overflow:
                    out["latency"] = router_latency(client, cfg.name, 30 if args.quick else args.latency_n)
                    print("latency", out["latency"], flush=True)
                if args.latency_only:
                    break
                rows = []
                for c in LEVELS:
                    total = max(c, 4) if args.quick else max(2 * c, 8)
                    row = sweep_level(target, c, total, args.max_new_tokens)
                    print("overflow" if overflow else "no-overflow", row, flush=True)
                    rows.append(row)
                out["overflow_on" if overflow else "overflow_off"] = rows
    finally:
        local.shutdown()
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
