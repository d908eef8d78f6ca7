"""The gRPC front alone (no Ray): TLS and mutual TLS with certificates the test generates, plaintext only
when allowed, bearer tokens (health stays open), per-client cap, message size, undecodable requests,
and that deadlines, cancellation, status codes and trailers cross it unchanged.

Behind the front runs a small in-process gRPC server standing in for Serve's gRPC proxy (a double: it
answers dgserve.v1.DGServe and grpc.health.v1.Health and records what reached it). The front with the
real proxy and router is covered by ``test_reliability_input.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tls_testlib import PKI, make_pki

from dgserve.serving.config import LimitSettings, TLSSettings
from dgserve.serving.front import Front
from dgserve.serving.security import InsecureTransportError, channel_credentials
from dgserve.v1 import dgserve_pb2 as pb
from dgserve.v1 import dgserve_pb2_grpc

TOKEN = "s3cret-token-0123456789"
pytestmark = pytest.mark.timeout(120)


class Upstream(dgserve_pb2_grpc.DGServeServicer):
    """Stands in for Serve's gRPC proxy: records metadata, deadlines and cancellations."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.cancelled = 0

    async def Generate(self, request, context):
        self.seen.append({"metadata": dict(context.invocation_metadata()), "remaining": context.time_remaining()})
        if request.prompt == "refuse":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full; retry after 1s",
                                (("retry-after-ms", "1000"),))
        if request.prompt == "router died":  # what Serve's proxy answers when the router replica dies mid-call
            await context.abort(grpc.StatusCode.INTERNAL, "The actor died unexpectedly before finishing this task.\n"
                                "\tclass_name: ServeReplica:dgserve:Router\n\tactor_id: 55\n\tpid: 22217\n")
        if request.prompt == "slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return pb.GenerateResponse(text=f"echo {request.prompt}", request_id=request.request_id)

    async def GenerateStream(self, request, context):
        self.seen.append({"metadata": dict(context.invocation_metadata()), "remaining": context.time_remaining()})
        try:
            for i in range(3 if request.prompt != "slow" else 1000):
                yield pb.GenerateStreamResponse(chunk=pb.TextChunk(index=i, text=str(i)))
                await asyncio.sleep(0.0 if request.prompt != "slow" else 0.05)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield pb.GenerateStreamResponse(finished=True)

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="double")


class Loop:
    """One asyncio loop in a thread for the upstream and the fronts; tests call in with ``run``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def upstream(loop):
    up = Upstream()

    async def start():
        server = grpc.aio.server()
        dgserve_pb2_grpc.add_DGServeServicer_to_server(up, server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run(start())
    up.target = f"127.0.0.1:{port}"
    yield up
    loop.run(server.stop(0))


@pytest.fixture
def front(loop, upstream):
    """``front(**kwargs) -> port``: a front before the upstream double (stopped after the test)."""
    started = []

    def make(**kw):
        kw.setdefault("allow_plaintext", kw.get("tls") is None)
        f = Front(upstream=upstream.target, port=0, host="127.0.0.1", **kw)
        port = loop.run(f.start())
        started.append(f)
        return f, port

    yield make
    for f in started:
        loop.run(f.stop(0))


def stub(port: int, creds=None, name="localhost"):
    ch = (grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", name)])
          if creds else grpc.insecure_channel(f"127.0.0.1:{port}"))
    return ch, dgserve_pb2_grpc.DGServeStub(ch), health_pb2_grpc.HealthStub(ch)


def call(fn, *args, **kw):
    try:
        return fn(*args, **kw), None
    except grpc.RpcError as e:
        return None, e


def auth(token=TOKEN):
    return [("authorization", f"Bearer {token}")]


def test_plaintext_is_refused_unless_explicitly_allowed(upstream):
    with pytest.raises(InsecureTransportError, match="allow_plaintext"):
        Front(upstream=upstream.target, port=0)
    Front(upstream=upstream.target, port=0, allow_plaintext=True)  # explicit: fine


def test_tls_serves_tls_clients_only(front, pki):
    _, port = front(tls=TLSSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key)))
    ch, s, h = stub(port, channel_credentials(str(pki.ca)))
    assert s.Generate(pb.GenerateRequest(prompt="hi"), timeout=10).text == "echo hi"
    assert h.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    ch.close()
    for creds in (None, channel_credentials(str(pki.rogue_ca))):  # plaintext client, or a CA it does not trust
        ch, s, _ = stub(port, creds)
        _, err = call(s.Generate, pb.GenerateRequest(prompt="hi"), timeout=5)
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
        ch.close()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(front, pki):
    tls = TLSSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key), client_ca_file=str(pki.ca))
    _, port = front(tls=tls)
    ok = channel_credentials(str(pki.ca), str(pki.client.cert), str(pki.client.key))
    ch, s, _ = stub(port, ok)
    assert s.Generate(pb.GenerateRequest(prompt="mtls"), timeout=10).text == "echo mtls"
    ch.close()
    for creds in (channel_credentials(str(pki.ca)),  # no client certificate
                  channel_credentials(str(pki.ca), str(pki.rogue_client.cert), str(pki.rogue_client.key)),
                  channel_credentials(str(pki.ca), str(pki.expired_client.cert), str(pki.expired_client.key))):
        ch, s, _ = stub(port, creds)
        _, err = call(s.Generate, pb.GenerateRequest(prompt="x"), timeout=5)
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
        ch.close()
    # optional client certificates: verified when presented, not required
    _, port = front(tls=tls.model_copy(update={"require_client_cert": False}))
    ch, s, _ = stub(port, channel_credentials(str(pki.ca)))
    assert s.Generate(pb.GenerateRequest(prompt="anon"), timeout=10).text == "echo anon"
    ch.close()


def test_bearer_token_required_except_for_health(front, tmp_path, upstream):
    tokens = tmp_path / "token"
    tokens.write_text(TOKEN + "\n")
    f, port = front(token_file=str(tokens))
    ch, s, h = stub(port)
    for md in ((), auth("wrong-token-0123456789"), [("authorization", TOKEN)], [("authorization", "Basic abc")]):
        _, err = call(s.Generate, pb.GenerateRequest(prompt="hi"), timeout=5, metadata=md)
        assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED, md
        assert "Bearer" in err.details() and TOKEN not in err.details()
    _, err = call(s.GetModelInfo, pb.GetModelInfoRequest(), timeout=5)
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert s.Generate(pb.GenerateRequest(prompt="hi"), timeout=5, metadata=auth()).text == "echo hi"
    assert h.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    # the router checks the token again: it travels on
    assert upstream.seen[-1]["metadata"]["authorization"] == f"Bearer {TOKEN}"
    # rotation: both tokens accepted while the Secret holds both, the old one refused once it is gone
    f.tokens._recheck_s = 0.0
    tokens.write_text("new-token-abcdefghijklmnop\n" + TOKEN + "\n")
    assert s.Generate(pb.GenerateRequest(prompt="a"), timeout=5, metadata=auth("new-token-abcdefghijklmnop")).text
    tokens.write_text("new-token-abcdefghijklmnop\n")
    time.sleep(0.01)  # a different mtime
    _, err = call(s.Generate, pb.GenerateRequest(prompt="b"), timeout=5, metadata=auth())
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


@pytest.mark.parametrize("content, match", [("", "holds no token"), ("short\n", "shorter than 16")])
def test_weak_or_empty_token_files_refuse_to_start(tmp_path, upstream, content, match):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(InsecureTransportError, match=match):
        Front(upstream=upstream.target, port=0, allow_plaintext=True, token_file=str(path))


def test_per_client_cap_and_its_retry_hint(front, upstream, loop):
    f, port = front(limits=LimitSettings(max_concurrent_per_client=2))
    ch, s, h = stub(port)
    streams = [s.GenerateStream(pb.GenerateRequest(prompt="slow"), timeout=30) for _ in range(2)]
    for st in streams:
        next(st)  # both in flight
    _, err = call(s.Generate, pb.GenerateRequest(prompt="third"), timeout=5)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ip:127.0.0.1" in err.details() and "max_concurrent_per_client 2" in err.details()
    assert ("retry-after-ms", "1000") in err.trailing_metadata()
    assert h.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # probes are never capped
    cancelled = upstream.cancelled
    for st in streams:
        st.cancel()
    deadline = time.monotonic() + 5
    while (upstream.cancelled < cancelled + 2 or loop.run(_in_flight(f))) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.cancelled == cancelled + 2  # the client's cancel reached the upstream call
    assert s.Generate(pb.GenerateRequest(prompt="again"), timeout=5).text == "echo again"
    ch.close()


async def _in_flight(f: Front) -> int:
    return f.limiter.in_flight("ip:127.0.0.1")


def test_mutual_tls_clients_are_capped_by_certificate_name(front, pki):
    tls = TLSSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key), client_ca_file=str(pki.ca))
    _, port = front(tls=tls, limits=LimitSettings(max_concurrent_per_client=1))
    a = stub(port, channel_credentials(str(pki.ca), str(pki.client.cert), str(pki.client.key)))
    b = stub(port, channel_credentials(str(pki.ca), str(pki.client_b.cert), str(pki.client_b.key)))
    held = a[1].GenerateStream(pb.GenerateRequest(prompt="slow"), timeout=30)
    next(held)
    _, err = call(a[1].Generate, pb.GenerateRequest(prompt="a2"), timeout=5)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "cn:client-a" in err.details()
    assert b[1].Generate(pb.GenerateRequest(prompt="b1"), timeout=5).text == "echo b1"  # another identity
    held.cancel()
    a[0].close()
    b[0].close()


def test_oversized_and_undecodable_requests(front, upstream):
    _, port = front(limits=LimitSettings(max_message_bytes=64 * 1024))
    ch, s, _ = stub(port)
    _, err = call(s.Generate, pb.GenerateRequest(prompt="x" * 100_000), timeout=5)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.details()
    raw = ch.unary_unary("/dgserve.v1.DGServe/Generate")  # no serializer: bytes on the wire
    for body in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff", b"\x0a\x10abc"):  # bad UTF-8, garbage, truncated
        _, err = call(raw, body, timeout=5)
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, (body, err)
        assert "dgserve.v1.GenerateRequest" in err.details()
    _, err = call(ch.unary_unary("/dgserve.v1.DGServe/NoSuchMethod"), b"", timeout=5)
    assert err is not None and err.code() == grpc.StatusCode.UNIMPLEMENTED
    ch.close()


def test_deadline_status_and_trailers_cross_unchanged(front, upstream):
    _, port = front()
    ch, s, _ = stub(port)
    s.Generate(pb.GenerateRequest(prompt="d"), timeout=7, metadata=[("dgserve-timeout-ms", "999999")])
    remaining = upstream.seen[-1]["remaining"]
    assert remaining is not None and 5 < remaining <= 7.1  # grpc-timeout is sent rounded up, e.g. 7009711u
    # the deadline also rides as metadata (Serve's proxy does not pass it on), set by the front, not the client
    assert 5000 < int(upstream.seen[-1]["metadata"]["dgserve-timeout-ms"]) <= 7100
    s.Generate(pb.GenerateRequest(prompt="d"), metadata=[("dgserve-timeout-ms", "1")])  # no deadline: none sent
    assert "dgserve-timeout-ms" not in upstream.seen[-1]["metadata"]
    t0 = time.monotonic()
    _, err = call(s.Generate, pb.GenerateRequest(prompt="slow"), timeout=0.5)
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 3
    _, err = call(s.Generate, pb.GenerateRequest(prompt="refuse"), timeout=5)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details() == "queue full; retry after 1s"
    assert ("retry-after-ms", "1000") in err.trailing_metadata()
    msgs = list(s.GenerateStream(pb.GenerateRequest(prompt="s"), timeout=10))
    assert [m.chunk.text for m in msgs[:-1]] == ["0", "1", "2"] and msgs[-1].finished
    ch.close()


def test_certificate_rotation_takes_effect_for_new_connections(front, tmp_path, pki):
    """The files of a mounted kubernetes.io/tls Secret change in place; the front re-reads them."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    _, port = front(tls=TLSSettings(cert_file=str(cert), key_file=str(key)))
    ch, s, _ = stub(port, channel_credentials(str(pki.ca)))
    assert s.Generate(pb.GenerateRequest(prompt="before"), timeout=10).text
    ch.close()
    new = make_pki(tmp_path / "new")  # a new CA and server certificate
    cert.write_bytes(new.server.cert.read_bytes())
    key.write_bytes(new.server.key.read_bytes())
    ch, s, _ = stub(port, channel_credentials(str(new.ca)))
    assert s.Generate(pb.GenerateRequest(prompt="after"), timeout=10).text == "echo after"
    ch.close()
    ch, s, _ = stub(port, channel_credentials(str(pki.ca)))  # the old CA no longer verifies it
    _, err = call(s.Generate, pb.GenerateRequest(prompt="old"), timeout=5)
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
    ch.close()


def test_missing_tls_files_fail_at_start_naming_the_file(upstream, tmp_path):
    with pytest.raises(InsecureTransportError, match="nope.crt"):
        Front(upstream=upstream.target, port=0,
              tls=TLSSettings(cert_file=str(tmp_path / "nope.crt"), key_file=str(tmp_path / "nope.key")))
    path = Path(tmp_path / "notpem.crt")
    path.write_text("hello")
    with pytest.raises(InsecureTransportError, match="not PEM"):
        Front(upstream=upstream.target, port=0, tls=TLSSettings(cert_file=str(path), key_file=str(path)))


def test_a_dead_router_is_unavailable_without_internals(front):
    f, port = front()
    ch, s, _ = stub(port)
    _, err = call(s.Generate, pb.GenerateRequest(prompt="router died"), timeout=5)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "retry" in err.details()
    assert "pid" not in err.details() and "actor_id" not in err.details()
    assert f.remapped == {"INTERNAL": 1}
    ch.close()
