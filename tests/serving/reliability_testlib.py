"""Helpers of the reliability and security tests on a real stack: the front (TLS, token, limits) before the
session's Serve gRPC proxy, raw protobuf wire encoding for requests a well-behaved client cannot build,
and the stack's idle/health view."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from dgserve.serving import local
from dgserve.serving.client import Client
from dgserve.serving.config import AppConfig
from dgserve.serving.front import Front, FrontThread
from dgserve.v1 import dgserve_pb2 as pb

DOCUMENTED_CODES = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED,
})
"""Every code the API documents (proto/dgserve/v1/dgserve.proto, docs/serving.md, docs/security.md)."""


@dataclass
class Stack:
    """A deployed app behind an in-process front."""

    config: AppConfig
    front: FrontThread
    target: str  # the front (what clients use)
    proxy: str  # Serve's gRPC proxy itself
    client_kwargs: dict[str, Any]

    def client(self, **overrides: Any) -> Client:
        return Client(self.target, **(self.client_kwargs | overrides))


@contextlib.contextmanager
def front_stack(config: AppConfig, proxy_port: int, **client_kwargs: Any) -> Iterator[Stack]:
    """Deploy ``config`` on the session's Serve (proxy on ``proxy_port``), start the front on
    ``config.router.grpc_port``; delete both after."""
    from ray import serve

    assert config.security.proxy_port == proxy_port
    front = None
    try:
        local.deploy(config)
        proxy = f"127.0.0.1:{proxy_port}"
        local.wait_healthy(proxy, timeout_s=120)
        front = FrontThread(Front.from_config(config))
        port = front.start()
        yield Stack(config, front, f"127.0.0.1:{port}", proxy, client_kwargs)
    finally:
        if front is not None:
            front.stop()
        serve.delete(config.name)


def call(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, grpc.RpcError | None]:
    try:
        return fn(*args, **kwargs), None
    except grpc.RpcError as e:
        return None, e


def consume(stream: Any) -> list[Any]:
    return list(stream)


def wait_idle(client: Client, timeout_s: float = 30.0) -> pb.ModelInfo:
    """Until no replica holds a request and nothing waits in the router (returns the last ModelInfo)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.info(timeout=10)
        busy = [r for b in info.backends for r in b.replicas if r.in_flight or r.engine_in_flight > 0]
        in_router = sum(b.router_in_flight for b in info.backends) + info.queued
        if (not busy and not in_router) or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def replica_ids(info: pb.ModelInfo) -> dict[int, set[str]]:
    return {b.backend: {r.replica for r in b.replicas if r.healthy} for b in info.backends}


# --- raw protobuf wire format (requests no generated client would send) ------------------------------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers as two's complement, like int32/int64 on the wire
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def chat_message(role: bytes, content: bytes) -> bytes:
    return field_bytes(1, role) + field_bytes(2, content)


def token_file(folder: Path, token: str) -> Path:
    path = folder / "token"
    path.write_text(token + "\n")
    return path
