"""The gRPC front: TLS (or explicitly allowed plaintext), bearer tokens, message-size and per-client limits
in front of Ray Serve's gRPC proxy.

Why a front. Ray 2.60's Serve gRPC proxy (``ray/serve/_private/grpc_util.py``) binds ``[::]:port``
with ``add_insecure_port`` and builds its server with ``interceptors=()``: no TLS, no interceptors, and
a 2 GiB message limit (``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``). The alternatives were worse:

* terminating TLS in the router replica (a ``grpc.aio`` server in its ``__init__``) bypasses the proxy,
  so Serve's ``max_ongoing_requests``, request metrics and autoscaling stop seeing ingress traffic;
* patching Ray's ``add_grpc_address`` ties us to a private function of one Ray version.

So the front is a small ``grpc.aio`` server that terminates TLS, checks the token, applies the
per-client cap and the message-size limit, checks that a request decodes (invalid UTF-8 in a
``string`` field would otherwise reach the client as UNKNOWN), and forwards the *raw bytes* of every
call, with the caller's metadata and remaining deadline, to the proxy on loopback. Everything after
the proxy is unchanged: Serve still routes every request to the Router and counts it. Cancellation
and deadlines propagate (a cancelled client cancels the upstream call, which aborts the request in
the engine), upstream status codes, details and trailers (``retry-after-ms``) come back as they were.

Where it runs: in ``dgserve serve`` (local mode), in-process; on Kubernetes, as a sidecar container
of each Ray pod (``dgserve front``), listening on the Service's port while the proxy moves to
``security.proxy_port``. Ray's proxy still listens on every interface on that internal port: the
router checks the token again, so a caller that bypasses the front still needs it (a NetworkPolicy
should keep the port closed; ``docs/security.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from dgserve.v1 import dgserve_pb2

from .config import AppConfig, LimitSettings, TLSSettings
from .messages import TIMEOUT_METADATA
from .security import (
    OPEN_METHODS,
    ClientLimiter,
    TokenFile,
    client_identity,
    require_transport,
    server_credentials,
)

log = logging.getLogger("dgserve.serving")

UPSTREAM_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
DROPPED_METADATA = frozenset({"user-agent", "grpc-timeout", "grpc-accept-encoding", "grpc-encoding", "te",
                              "content-type", TIMEOUT_METADATA})  # the front sets the last from the real deadline
RETRY_AFTER_MS = "1000"


@dataclass(frozen=True)
class _Method:
    name: str  # "/package.Service/Method"
    request_class: Any
    client_streaming: bool
    server_streaming: bool


def _methods() -> dict[str, _Method]:
    """Every method the front forwards: dgserve.v1.DGServe, grpc.health.v1.Health, server reflection."""
    out = {}
    for file in (dgserve_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for m in service.methods:
                name = f"/{service.full_name}/{m.name}"
                out[name] = _Method(name, GetMessageClass(m.input_type), m.client_streaming, m.server_streaming)
    return out


METHODS = _methods()


ACTOR_DEATH = ("actor died", "ActorDiedError", "RayActorError", "ActorUnavailableError")


def upstream_status(code: grpc.StatusCode, details: str) -> tuple[grpc.StatusCode, str]:
    """The status the client gets for an upstream one. The router maps every error itself, but when the router
    replica itself dies mid-request Serve's proxy answers INTERNAL "The actor died unexpectedly ..." with the
    actor id, pid and name: that is UNAVAILABLE (retry: Serve restarts the router), without the internals."""
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        if any(marker in details for marker in ACTOR_DEATH):
            return (grpc.StatusCode.UNAVAILABLE, "the router replica handling the request died; Serve restarts it: "
                    "retry")
        if "Traceback" in details or "pid:" in details or "actor_id" in details:
            return code, details.strip().splitlines()[0][:200] if details.strip() else "internal error"
    return code, details


class Front(grpc.GenericRpcHandler):
    """The front's server and its one generic handler (``await front.start()`` -> port)."""

    def __init__(self, *, upstream: str, port: int, host: str = "[::]", tls: TLSSettings | None = None,
                 allow_plaintext: bool = False, token_file: str | None = None,
                 limits: LimitSettings | None = None) -> None:
        require_transport(tls, allow_plaintext)
        self.upstream, self.host, self.port = upstream, host, port
        self.tls = tls
        self.limits = limits or LimitSettings()
        self.tokens = TokenFile(token_file) if token_file else None
        self.limiter = ClientLimiter(self.limits.max_concurrent_per_client)
        self._credentials = server_credentials(tls) if tls is not None else None
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self.forwarded = 0
        self.refused: dict[str, int] = {}
        self.remapped: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: AppConfig, *, upstream_host: str = "127.0.0.1") -> Front:
        s = cfg.security
        if s.proxy_port is None:
            raise ValueError("the front needs security.proxy_port (the port of Serve's gRPC proxy behind it)")
        return cls(upstream=f"{upstream_host}:{s.proxy_port}", port=cfg.router.grpc_port, host=s.listen_host,
                   tls=s.tls, allow_plaintext=s.allow_plaintext, token_file=s.auth.token_file if s.auth else None,
                   limits=s.limits)

    @property
    def transport(self) -> str:
        if self.tls is None:
            return "plaintext"
        return "mtls" if self.tls.client_ca_file else "tls"

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> int:
        options = [("grpc.max_receive_message_length", self.limits.max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # never share a port silently with another server
        self._server = grpc.aio.server(handlers=[self], options=options)
        address = f"{self.host}:{self.port}"
        if self._credentials is not None:
            bound = self._server.add_secure_port(address, self._credentials)
        else:
            bound = self._server.add_insecure_port(address)
        if not bound:
            raise OSError(f"front: cannot listen on {address}")
        self.port = bound
        self._channel = grpc.aio.insecure_channel(self.upstream, options=[
            ("grpc.max_send_message_length", self.limits.max_message_bytes),
            ("grpc.max_receive_message_length", UPSTREAM_MAX_RESPONSE_BYTES)])
        await self._server.start()
        log.info("front: %s on %s:%d -> Serve gRPC proxy %s (auth %s, per-client cap %s)", self.transport,
                 self.host, bound, self.upstream, "bearer" if self.tokens else "none",
                 self.limits.max_concurrent_per_client)
        return bound

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        if self._channel is not None:
            await self._channel.close()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    # -- grpc.GenericRpcHandler ---------------------------------------------------------------------
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        m = METHODS.get(handler_call_details.method)
        if m is None:
            return None  # UNIMPLEMENTED
        if m.client_streaming and m.server_streaming:
            return grpc.stream_stream_rpc_method_handler(functools.partial(self._bidi, m))
        if m.server_streaming:
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._unary_stream, m))
        if m.client_streaming:
            return None  # no such method in our services
        # partial, not lambda: grpc.aio looks at the callable to tell coroutines and async generators apart
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, m))

    # -- admission -------------------------------------------------------------------------------------
    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str,
                      trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self.refused[code.name] = self.refused.get(code.name, 0) + 1
        await context.abort(code, details, trailers)

    @contextlib.asynccontextmanager
    async def _admitted(self, m: _Method, context: grpc.aio.ServicerContext, request: bytes | None = None):
        """Token, per-client cap and request decoding; yields the metadata to forward."""
        metadata = tuple(context.invocation_metadata() or ())
        open_method = m.name in OPEN_METHODS
        if self.tokens is not None and not open_method:
            from .errors import ServingError

            try:
                self.tokens.check(metadata)
            except ServingError as e:
                await self._refuse(context, e.code, str(e))
        if request is not None:
            try:
                m.request_class.FromString(request)
            except DecodeError as e:
                await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                   f"request is not a valid {m.request_class.DESCRIPTOR.full_name}: {e}")
        client = client_identity(context)
        if not open_method and not self.limiter.acquire(client):
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"client {client} already has {self.limiter.in_flight(client)} requests in flight "
                               f"(security.limits.max_concurrent_per_client {self.limiter.cap}); retry after "
                               f"{int(RETRY_AFTER_MS) / 1000:g}s",
                               (("retry-after-ms", RETRY_AFTER_MS), ("grpc-retry-pushback-ms", RETRY_AFTER_MS)))
        forwarded = tuple((k, v) for k, v in metadata if k not in DROPPED_METADATA and not k.startswith(":"))
        left = context.time_remaining()
        if left is not None:  # the deadline travels on to the replicas, which stop the request there themselves
            forwarded += ((TIMEOUT_METADATA, str(max(0, int(left * 1000)))),)
        try:
            yield forwarded
        finally:
            if not open_method:
                self.limiter.release(client)

    async def _relay_error(self, context: grpc.aio.ServicerContext, e: grpc.aio.AioRpcError) -> None:
        code, details = upstream_status(e.code(), e.details() or "")
        if code != e.code():
            self.remapped[e.code().name] = self.remapped.get(e.code().name, 0) + 1
        await context.abort(code, details, tuple(e.trailing_metadata() or ()))

    # -- forwarding ---------------------------------------------------------------------------------------
    async def _unary(self, m: _Method, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with self._admitted(m, context, request) as metadata:
            assert self._channel is not None
            call = self._channel.unary_unary(m.name)(request, metadata=metadata, timeout=context.time_remaining())
            try:
                response = await call
            except grpc.aio.AioRpcError as e:
                await self._relay_error(context, e)
            except asyncio.CancelledError:
                call.cancel()
                raise
            trailers = await call.trailing_metadata()
            if trailers:
                context.set_trailing_metadata(tuple(trailers))
            self.forwarded += 1
            return response

    async def _unary_stream(self, m: _Method, request: bytes, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[bytes]:
        async with self._admitted(m, context, request) as metadata:
            assert self._channel is not None
            call = self._channel.unary_stream(m.name)(request, metadata=metadata, timeout=context.time_remaining())
            async with contextlib.aclosing(self._relay_stream(call, context)) as stream:  # a gone client closes it now
                async for message in stream:
                    yield message
            self.forwarded += 1

    async def _bidi(self, m: _Method, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[bytes]:
        async with self._admitted(m, context) as metadata:
            assert self._channel is not None
            call = self._channel.stream_stream(m.name)(requests, metadata=metadata, timeout=context.time_remaining())
            async with contextlib.aclosing(self._relay_stream(call, context)) as stream:  # a gone client closes it now
                async for message in stream:
                    yield message

    async def _relay_stream(self, call, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Upstream messages to the client; upstream errors as the client's status."""
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as e:
            await self._relay_error(context, e)
        finally:
            if not call.done():
                call.cancel()  # the client went away: abort upstream, which frees the engine slot


class FrontThread:
    """A :class:`Front` on its own event loop in a daemon thread (local mode, tests).

    ``with FrontThread(front) as port: ...`` or ``start()`` / ``stop()``.
    """

    def __init__(self, front: Front) -> None:
        self.front = front
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dgserve-front", daemon=True)

    def start(self, timeout_s: float = 30.0) -> int:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.front.start(), self._loop).result(timeout_s)

    def stop(self, grace: float = 1.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.front.stop(grace), self._loop).result(grace + 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def call(self, fn: Any, timeout_s: float = 10.0) -> Any:
        """Run ``fn()`` on the front's loop (reading its counters safely)."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def __enter__(self) -> int:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def serve_forever(cfg: AppConfig, *, upstream_host: str = "127.0.0.1") -> None:
    """``dgserve front``: run the front until cancelled (SIGTERM)."""
    front = Front.from_config(cfg, upstream_host=upstream_host)
    await front.start()
    try:
        await front.wait()
    finally:
        await front.stop(5.0)
