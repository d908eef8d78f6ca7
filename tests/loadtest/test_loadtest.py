"""The load generator without a dgserve stack: request mix, percentiles, the closed loop's exact accounting
(every request sent gets exactly one record), CSV and PNG output, and the CLI. The server here is a small
in-process gRPC stand-in for a dgserve endpoint (a double: it answers Generate/GenerateStream instantly,
refuses every fifth request with RESOURCE_EXHAUSTED, and counts concurrency); the real stack is loaded
by tests/serving/test_reliability_load.py."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import threading

import grpc
import pytest

from dgserve.loadtest.harness import Kind, Mix, Target, default_kinds, run_level_async, sweep
from dgserve.loadtest.report import pct, plot, summarize
from dgserve.v1 import dgserve_pb2 as pb
from dgserve.v1 import dgserve_pb2_grpc


class StandIn(dgserve_pb2_grpc.DGServeServicer):
    def __init__(self):
        self.calls = 0
        self.in_flight = 0
        self.peak = 0
        self.metadata = []

    async def _enter(self, context):
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.metadata.append(dict(context.invocation_metadata()))
        await asyncio.sleep(0.005)
        self.in_flight -= 1
        if self.calls % 5 == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")

    async def Generate(self, request, context):
        await self._enter(context)
        backend = pb.BACKEND_DIFFUSION if request.routing == pb.GenerateRequest.DIFFUSION_ONLY or self.calls % 2 \
            else pb.BACKEND_AUTOREGRESSIVE
        return pb.GenerateResponse(backend=backend, replica="r1", replica_in_flight=1,
                                   usage=pb.Usage(completion_tokens=request.max_new_tokens))

    async def GenerateStream(self, request, context):
        await self._enter(context)
        yield pb.GenerateStreamResponse(chunk=pb.TextChunk(index=0, token_ids=[1, 2]))
        await asyncio.sleep(0.01)
        yield pb.GenerateStreamResponse(finished=True, backend=pb.BACKEND_DIFFUSION, replica="r2",
                                        usage=pb.Usage(completion_tokens=2))


@pytest.fixture(scope="module")
def server():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    standin = StandIn()

    async def start():
        s = grpc.aio.server()
        dgserve_pb2_grpc.add_DGServeServicer_to_server(standin, s)
        port = s.add_insecure_port("127.0.0.1:0")
        await s.start()
        return s, port

    srv, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    standin.target = f"127.0.0.1:{port}"
    yield standin
    asyncio.run_coroutine_threadsafe(srv.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_mix_parsing_and_draws():
    kinds = default_kinds(4, 32)
    mix = Mix.parse("short=3,stream,diffusion=0", kinds)
    assert [(k.name, w) for k, w in mix.kinds] == [("short", 3), ("stream", 1)]
    rng = random.Random(0)
    draws = [mix.draw(rng).name for _ in range(4000)]
    assert 0.7 < draws.count("short") / len(draws) < 0.8
    for bad in ("nope=1", "", "short=-1"):
        with pytest.raises(ValueError):
            Mix.parse(bad, kinds)
    r = kinds["diffusion"].request(3, seed=9)
    assert r.routing == pb.GenerateRequest.DIFFUSION_ONLY and r.max_new_tokens == 4 and r.seed == 9 and r.messages


@pytest.mark.parametrize("xs, q, want", [([], 50, None), ([5.0], 99, 5.0), (list(range(1, 101)), 50, 50),
                                         (list(range(1, 101)), 90, 90), (list(range(1, 101)), 99, 99),
                                         ([3, 1, 2], 100, 3)])
def test_percentiles_nearest_rank(xs, q, want):
    got = pct(xs, q)
    assert (got != got) if want is None else got == want


def test_every_request_gets_exactly_one_record(server):
    mix = Mix(((Kind("u", 3), 2), (Kind("s", 2, stream=True), 1), (Kind("d", 3, routing="diffusion"), 1)))
    calls_before = server.calls
    records = asyncio.run(run_level_async(Target(server.target, token="tok-0123456789abcdef"), 16, mix,
                                          requests=203))
    assert len(records) == 203 == server.calls - calls_before  # no request lost, none sent twice
    row = summarize(records)
    assert row["ok"] + row["errors"] == 203
    assert row["errors"] == sum(int(c.split("=")[1]) for c in row["errors_by_code"].split(";") if c) > 0
    assert {r.code for r in records} == {"OK", "RESOURCE_EXHAUSTED"}
    assert server.peak == 16  # the closed loop reaches its concurrency and never exceeds it
    streams = [r for r in records if r.kind == "s" and r.code == "OK"]
    assert streams and all(0 < r.ttfc_s <= r.latency_s for r in streams)
    assert row["share_diffusion"] + row["share_autoregressive"] == pytest.approx(1.0)
    assert server.metadata[-1]["authorization"] == "Bearer tok-0123456789abcdef"


def test_sweep_writes_csv_and_plots(server, tmp_path):
    rows = []
    records = sweep(Target(server.target), [1, 4], Mix(((Kind("u", 1), 1),)), requests_per_client=5,
                    on_level=lambda c, recs: rows.append(summarize(recs)))
    assert [r["requests"] for r in rows] == [5, 20] and len(records) == 25
    paths = plot(rows, tmp_path)
    assert sorted(p.name for p in paths) == ["backends.png", "errors.png", "latency.png", "throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_cli_end_to_end(server, tmp_path):
    from dgserve.cli import main

    out = tmp_path / "run"
    assert main(["loadtest", "--target", server.target, "--levels", "1,2", "--requests", "10", "--mix",
                 "short=1,stream=1", "--short-tokens", "2", "--out", str(out)]) == 0
    levels = list(csv.DictReader((out / "levels.csv").open()))
    assert [int(r["concurrency"]) for r in levels] == [1, 2] and all(int(r["requests"]) == 10 for r in levels)
    assert {"p50_ms", "p90_ms", "p99_ms", "ttfc_p50_ms", "share_diffusion", "errors_by_code"} <= set(levels[0])
    reqs = list(csv.DictReader((out / "requests.csv").open()))
    assert len(reqs) == 20
    assert json.loads((out / "summary.json").read_text())["target"] == server.target
    assert (out / "latency.png").exists()
    assert main(["loadtest", "--target", server.target, "--mix", "bogus"]) == 2
