"""Closed-loop load on the dgserve.v1 gRPC API: ``concurrency`` workers, each sending its next request as
soon as the previous one ends, with a mix of request kinds.

Why a small asyncio harness and not Locust's gRPC user: Locust runs on gevent, and grpcio only works
there after ``grpc.experimental.gevent.init_gevent()`` monkeypatching, with one greenlet per user and
its own statistics that know nothing of our backends, replicas or canvases. Here one ``grpc.aio``
event loop holds hundreds of concurrent calls (unary and server streaming) in one process, times the
first streamed canvas exactly, records the status code, backend, replica and its batch for every
request, needs no new dependency, and is the same code the CI soak test runs.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from dgserve.v1 import dgserve_pb2 as pb
from dgserve.v1 import dgserve_pb2_grpc

BACKENDS = {pb.BACKEND_DIFFUSION: "diffusion", pb.BACKEND_AUTOREGRESSIVE: "autoregressive",
            pb.BACKEND_UNSPECIFIED: "none"}
ROUTING = {"any": pb.GenerateRequest.ANY, "diffusion": pb.GenerateRequest.DIFFUSION_ONLY,
           "autoregressive": pb.GenerateRequest.AUTOREGRESSIVE_ONLY}


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix."""

    name: str
    max_new_tokens: int
    routing: str = "any"
    stream: bool = False
    max_denoising_steps: int | None = None
    chat: bool = True

    def request(self, i: int, seed: int) -> pb.GenerateRequest:
        text = f"Request {i}: write one short sentence about the number {i % 97}."
        r = pb.GenerateRequest(routing=ROUTING[self.routing], max_new_tokens=self.max_new_tokens, seed=seed)
        if self.chat:
            r.messages.add(role="user", content=text)
        else:
            r.prompt = text
        if self.max_denoising_steps is not None:
            r.sampling.max_denoising_steps = self.max_denoising_steps
        return r


def default_kinds(short: int = 16, long: int = 128, steps: int | None = None) -> dict[str, Kind]:
    """The four kinds of the issue: short and long unary (ANY), streaming (ANY), diffusion-only."""
    return {"short": Kind("short", short, max_denoising_steps=steps),
            "long": Kind("long", long, max_denoising_steps=steps),
            "stream": Kind("stream", short, stream=True, max_denoising_steps=steps),
            "diffusion": Kind("diffusion", short, routing="diffusion", max_denoising_steps=steps)}


@dataclass(frozen=True)
class Mix:
    """Weighted kinds; request ``i`` gets a kind drawn from a seeded generator (same mix every run)."""

    kinds: tuple[tuple[Kind, int], ...]

    @classmethod
    def parse(cls, spec: str, kinds: dict[str, Kind]) -> Mix:
        """``"short=4,long=1,stream=2,diffusion=1"`` (a bare name weighs 1)."""
        out = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, weight = part.partition("=")
            if name not in kinds:
                raise ValueError(f"unknown request kind {name!r}; known: {sorted(kinds)}")
            w = int(weight) if weight else 1
            if w < 0:
                raise ValueError(f"weight of {name} must be >= 0, got {w}")
            if w:
                out.append((kinds[name], w))
        if not out:
            raise ValueError(f"empty mix {spec!r}")
        return cls(tuple(out))

    def draw(self, rng: random.Random) -> Kind:
        kinds, weights = zip(*self.kinds)
        return rng.choices(kinds, weights=weights)[0]


@dataclass(frozen=True)
class Record:
    """One request as the client saw it."""

    level: int  # concurrency of the level it ran in
    kind: str
    start_s: float  # since the level started
    latency_s: float
    code: str  # gRPC status code name; OK on success
    details: str = ""
    ttfc_s: float | None = None  # streams: time to the first canvas (diffusion) or token chunk (fallback)
    backend: str = "none"
    replica: str = ""
    replica_in_flight: int = 0  # the batch the request joined on its replica (measured inside the replica)
    tokens: int = 0
    server_first_chunk_s: float | None = None  # the server's own dispatch -> first chunk (unary responses)


@dataclass
class Target:
    """Where and how to connect (TLS / mutual TLS credentials, bearer token)."""

    address: str
    credentials: grpc.ChannelCredentials | None = None
    token: str | None = None
    server_name: str | None = None
    timeout_s: float = 120.0
    metadata: tuple[tuple[str, str], ...] = field(default=())

    def channel(self) -> grpc.aio.Channel:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.address, self.credentials, options=options)
        return grpc.aio.insecure_channel(self.address, options=options)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        auth = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        return auth + self.metadata


async def _one(stub: dgserve_pb2_grpc.DGServeStub, target: Target, kind: Kind, i: int, level: int,
               t_level: float, seed: int) -> Record:
    req = kind.request(i, seed)
    md = target.call_metadata() or None
    t0 = time.perf_counter()
    start = t0 - t_level
    ttfc = None
    try:
        if kind.stream:
            final = None
            tokens = 0
            async for msg in stub.GenerateStream(req, timeout=target.timeout_s, metadata=md):
                if msg.WhichOneof("event") == "chunk":
                    tokens += len(msg.chunk.token_ids)
                    if ttfc is None:
                        ttfc = time.perf_counter() - t0
                if msg.finished:
                    final = msg
            latency = time.perf_counter() - t0
            if final is None:
                return Record(level, kind.name, start, latency, "STREAM_ENDED_WITHOUT_FINAL", ttfc_s=ttfc)
            return Record(level, kind.name, start, latency, "OK", ttfc_s=ttfc, backend=BACKENDS[final.backend],
                          replica=final.replica, replica_in_flight=final.replica_in_flight,
                          tokens=final.usage.completion_tokens or tokens)
        resp = await stub.Generate(req, timeout=target.timeout_s, metadata=md)
        return Record(level, kind.name, start, time.perf_counter() - t0, "OK", backend=BACKENDS[resp.backend],
                      replica=resp.replica, replica_in_flight=resp.replica_in_flight,
                      tokens=resp.usage.completion_tokens, server_first_chunk_s=resp.timings.first_chunk_ms / 1e3)
    except grpc.aio.AioRpcError as e:
        return Record(level, kind.name, start, time.perf_counter() - t0, e.code().name, e.details() or "",
                      ttfc_s=ttfc)


async def run_level_async(target: Target, concurrency: int, mix: Mix, *, requests: int | None = None,
                          duration_s: float | None = None, seed: int = 0,
                          channel: grpc.aio.Channel | None = None) -> list[Record]:
    """``concurrency`` closed-loop workers until ``requests`` were sent (or ``duration_s`` passed).

    Every request sent gets exactly one Record: a response, or the gRPC error it ended with.
    """
    if (requests is None) == (duration_s is None):
        raise ValueError("give exactly one of requests or duration_s")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    own = channel is None
    ch = channel or target.channel()
    stub = dgserve_pb2_grpc.DGServeStub(ch)
    rng = random.Random(seed)
    counter = itertools.count()
    records: list[Record] = []
    t_level = time.perf_counter()
    stop_at = None if duration_s is None else t_level + duration_s

    async def worker() -> None:
        while True:
            i = next(counter)
            if requests is not None and i >= requests:
                return
            if stop_at is not None and time.perf_counter() >= stop_at:
                return
            kind = mix.draw(rng)
            records.append(await _one(stub, target, kind, i, concurrency, t_level, seed * 1_000_003 + i))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        if own:
            await ch.close()
    return records


def run_level(target: Target, concurrency: int, mix: Mix, **kwargs: Any) -> list[Record]:
    return asyncio.run(run_level_async(target, concurrency, mix, **kwargs))


def sweep(target: Target, levels: Sequence[int], mix: Mix, *, requests_per_level: int | None = None,
          requests_per_client: int | None = None, duration_s: float | None = None, seed: int = 0,
          on_level: Any = None) -> list[Record]:
    """One level per concurrency, in order; ``requests_per_client`` scales the count with the level."""
    out: list[Record] = []
    for c in levels:
        n = requests_per_level if requests_per_client is None else max(c * requests_per_client, 1)
        recs = run_level(target, c, mix, requests=n if duration_s is None else None, duration_s=duration_s,
                         seed=seed + c)
        out += recs
        if on_level is not None:
            on_level(c, recs)
    return out
