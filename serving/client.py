"""A small gRPC client of the dgserve.v1 API (what ``dgserve generate`` and the tests use)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dgserve.v1 import dgserve_pb2 as pb
from dgserve.v1 import dgserve_pb2_grpc

ROUTING = {"any": pb.GenerateRequest.ANY, "diffusion": pb.GenerateRequest.DIFFUSION_ONLY,
           "autoregressive": pb.GenerateRequest.AUTOREGRESSIVE_ONLY}


def make_request(prompt: str | None = None, *, messages: Sequence[tuple[str, str]] = (),
                 max_new_tokens: int | None = None, seed: int | None = None, routing: str = "any",
                 stream_drafts: bool = False, request_id: str = "", stop_token_ids: Sequence[int] = (),
                 pinned: Sequence[tuple[int, int]] = (), infill: tuple[str, str] | None = None,
                 **sampling: Any) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=prompt or "", routing=ROUTING[routing], stream_drafts=stream_drafts,
                             request_id=request_id, stop_token_ids=list(stop_token_ids))
    req.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    req.pinned.extend(pb.PinnedToken(position=p, token_id=t) for p, t in pinned)
    if infill is not None:
        req.infill.prefix, req.infill.suffix = infill
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    if seed is not None:
        req.seed = seed
    for k, v in sampling.items():
        setattr(req.sampling, k, v)
    return req


class Client:
    """``with Client("127.0.0.1:9000") as c: c.generate(make_request("hi"))``.

    ``credentials``: TLS (``dgserve.serving.security.channel_credentials``), None = plaintext;
    ``token``: a bearer token sent with every call except the health check;
    ``server_name``: the name to verify the server's certificate against (default: the target's host).
    """

    def __init__(self, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, server_name: str | None = None) -> None:
        self.target = target
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self.channel = (grpc.secure_channel(target, credentials, options=options) if credentials is not None
                        else grpc.insecure_channel(target))
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = dgserve_pb2_grpc.DGServeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def _md(self, metadata: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]] | None:
        return [*self._auth, *metadata] or None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, request: pb.GenerateRequest, timeout: float | None = 60.0,
                 metadata: Sequence[tuple[str, str]] = ()) -> pb.GenerateResponse:
        """``metadata``: e.g. ``[("traceparent", "00-<trace id>-<span id>-01")]`` to continue a trace."""
        return self.stub.Generate(request, timeout=timeout, metadata=self._md(metadata))

    def generate_with_call(self, request: pb.GenerateRequest, timeout: float | None = 60.0):
        """(response, call): the call carries trailing metadata (e.g. retry-after-ms)."""
        return self.stub.Generate.with_call(request, timeout=timeout, metadata=self._md())

    def stream(self, request: pb.GenerateRequest, timeout: float | None = 60.0,
               metadata: Sequence[tuple[str, str]] = ()) -> Iterator[pb.GenerateStreamResponse]:
        """The streaming call itself (iterate it; ``.cancel()`` cancels it)."""
        return self.stub.GenerateStream(request, timeout=timeout, metadata=self._md(metadata))

    def info(self, timeout: float | None = 10.0) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._md())

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def retry_after_ms(call_or_error: Any) -> int | None:
    """The router's retry hint from a call's (or RpcError's) trailing metadata."""
    for key, value in call_or_error.trailing_metadata() or ():
        if key == "retry-after-ms":
            return int(value)
    return None
