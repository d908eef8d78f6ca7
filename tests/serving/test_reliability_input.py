"""Bad input, fuzzing and security on the real stack: mutual TLS + bearer token front -> Serve's gRPC proxy ->
Router -> DiffusionReplica (real engine, tiny random checkpoint) / AutoregressiveFallback (real SmolLM2).

* a table of malformed and hostile requests, each answered with its documented status code and a
  message that names the problem (never INTERNAL/UNKNOWN, never a traceback);
* a hypothesis fuzz of 1,000 structured requests (and 300 raw byte strings) through the real server:
  never INTERNAL or UNKNOWN, the router's own validation predicts every refusal, and afterwards the
  server is healthy, idle, and runs the same replicas (nothing crashed);
* the token checked at the front and again by the router (a caller that bypasses the front), the
  health check open to probes.

One app for the module: 1 diffusion replica (cap 4, 2 denoising steps by default), SmolLM2 with 2 new
tokens by default; limits: max_new_tokens 64, prompt 20,000 characters, 64 messages, 256 KiB messages.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_testlib import (
    DOCUMENTED_CODES,
    call,
    chat_message,
    field_bytes,
    field_varint,
    front_stack,
    replica_ids,
    token_file,
    wait_idle,
)
from serving_testlib import app_config
from tls_testlib import make_pki

from dgserve.serving.client import Client, make_request
from dgserve.serving.config import LimitSettings
from dgserve.serving.errors import ServingError
from dgserve.serving.local import free_port
from dgserve.serving.router import plan_request
from dgserve.serving.security import channel_credentials
from dgserve.v1 import dgserve_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKEN = "reliability-token-0123456789abcdef"
LIMITS = {"max_new_tokens": 64, "max_prompt_chars": 20_000, "max_messages": 64, "max_message_bytes": 256 * 1024,
          "max_concurrent_per_client": 16}
C = grpc.StatusCode


@pytest.fixture(scope="module")
def stack(tiny_model, serve_port, tmp_path_factory):
    folder = tmp_path_factory.mktemp("security")
    pki = make_pki(folder / "pki")
    cfg = app_config(
        tiny_model, free_port(),
        diffusion={"num_replicas": 1, "engine": {"max_batch": 4, "max_denoising_steps": 2}},
        fallback={"max_batch": 8, "default_max_new_tokens": 2},
        security={"tls": {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
                          "client_ca_file": str(pki.ca)},
                  "auth": {"token_file": str(token_file(folder, TOKEN))}, "limits": LIMITS,
                  "proxy_port": serve_port})
    creds = channel_credentials(str(pki.ca), str(pki.client.cert), str(pki.client.key))
    with front_stack(cfg, serve_port, credentials=creds, token=TOKEN) as s:
        s.pki = pki
        with s.client() as c:
            s.initial_replicas = replica_ids(c.info())
        yield s


@pytest.fixture(scope="module")
def client(stack):
    with stack.client() as c:
        yield c


# --- the table ---------------------------------------------------------------------------------------

def req(*args: Any, **kw: Any) -> pb.GenerateRequest:
    kw.setdefault("max_new_tokens", 4)
    return make_request(*args, **kw)


def with_routing(r: pb.GenerateRequest, value: int) -> pb.GenerateRequest:
    r.routing = value  # proto3 enums are open: unknown numbers survive the wire
    return r


GOOD = bytes(req("ok").SerializeToString())
PROMPT_FIELD, MESSAGES_FIELD, MAX_NEW_FIELD, ROUTING_FIELD = 1, 2, 3, 9


@dataclass(frozen=True)
class Case:
    name: str
    send: Any  # a GenerateRequest, or raw bytes for the Generate method
    code: grpc.StatusCode
    match: str  # a substring of the status details
    stream: bool = False


CASES = [
    Case("empty request", pb.GenerateRequest(), C.INVALID_ARGUMENT, "empty request"),
    Case("prompt and messages both", req("a", messages=[("user", "b")]), C.INVALID_ARGUMENT, "not both"),
    Case("message without role", req(messages=[("", "b")]), C.INVALID_ARGUMENT, "role is empty"),
    Case("role of 100 characters", req(messages=[("r" * 100, "b")]), C.INVALID_ARGUMENT, "role has 100 characters"),
    Case("max_new_tokens 0", req("a", max_new_tokens=0), C.INVALID_ARGUMENT, "max_new_tokens must be positive"),
    Case("max_new_tokens over the cap", req("a", max_new_tokens=65), C.INVALID_ARGUMENT,
         "exceeds the limit of 64"),
    Case("max_new_tokens 2**32-1", req("a", max_new_tokens=2**32 - 1), C.INVALID_ARGUMENT, "4294967295"),
    Case("negative max_new_tokens on the wire", field_bytes(PROMPT_FIELD, b"a") + field_varint(MAX_NEW_FIELD, -1),
         C.INVALID_ARGUMENT, "4294967295"),  # uint32 reads -1 as 2**32-1
    Case("prompt longer than the context", req("word " * 2100), C.OUT_OF_RANGE, "exceeds the served context"),
    Case("prompt longer than the context, stream", req("word " * 2100), C.OUT_OF_RANGE, "served context",
         stream=True),
    Case("prompt over the character cap", req("x" * 20_001), C.INVALID_ARGUMENT, "limit of 20000"),
    Case("message over the size limit", req("x" * 300_000), C.RESOURCE_EXHAUSTED, "larger than max"),
    Case("65 chat messages", req(messages=[("user", "m")] * 65), C.INVALID_ARGUMENT, "limit of 64"),
    Case("invalid UTF-8 in a chat message", field_bytes(MESSAGES_FIELD, chat_message(b"user", b"caf\xc3(")),
         C.INVALID_ARGUMENT, "GenerateRequest"),
    Case("invalid UTF-8 in a role", field_bytes(MESSAGES_FIELD, chat_message(b"\xff", b"hi")), C.INVALID_ARGUMENT,
         "GenerateRequest"),
    Case("invalid UTF-8 in the prompt", field_bytes(PROMPT_FIELD, b"\xed\xa0\x80"), C.INVALID_ARGUMENT,
         "GenerateRequest"),  # an encoded UTF-16 surrogate
    Case("invalid UTF-8 in the prompt, stream", field_bytes(PROMPT_FIELD, b"\xc0\xaf"), C.INVALID_ARGUMENT,
         "GenerateRequest", stream=True),  # overlong encoding of '/'
    Case("garbage bytes", b"\xff\xff\xff\xff", C.INVALID_ARGUMENT, "GenerateRequest"),
    Case("truncated message", GOOD[:3], C.INVALID_ARGUMENT, "GenerateRequest"),
    Case("length prefix past the end", field_bytes(PROMPT_FIELD, b"abc")[:2] + b"\x7f", C.INVALID_ARGUMENT,
         "GenerateRequest"),
    Case("unknown routing value", with_routing(req("a"), 7), C.INVALID_ARGUMENT, "unknown routing value 7"),
    Case("negative routing value on the wire", field_bytes(PROMPT_FIELD, b"a") + field_varint(ROUTING_FIELD, -5),
         C.INVALID_ARGUMENT, "unknown routing value -5"),
    Case("conflicting pinned positions", req("a", pinned=[(1, 5), (1, 6)]), C.INVALID_ARGUMENT,
         "given two different tokens"),
    Case("pinned position past max_new_tokens", req("a", pinned=[(4, 5)]), C.INVALID_ARGUMENT,
         "pinned position 4 is outside"),
    Case("pinned token outside the vocabulary", req("a", pinned=[(0, 2**32 - 1)]), C.INVALID_ARGUMENT,
         "outside the vocabulary"),
    Case("pinned and infill", req("a", pinned=[(0, 5)], infill=("p", "s")), C.INVALID_ARGUMENT,
         "cannot be combined"),
    Case("pinned with AUTOREGRESSIVE_ONLY", req("a", pinned=[(0, 5)], routing="autoregressive"),
         C.INVALID_ARGUMENT, "need the diffusion backend"),
    Case("infill suffix without max_new_tokens", make_request("a", infill=("p", "s")), C.INVALID_ARGUMENT,
         "infill needs max_new_tokens"),
    Case("infill suffix longer than the window", req("a", infill=("p", "s" * 40)), C.INVALID_ARGUMENT,
         "does not leave room"),
    Case("stop token outside the vocabulary", req("a", stop_token_ids=[2**31]), C.INVALID_ARGUMENT,
         "stop token id"),
    Case("300 stop tokens", req("a", stop_token_ids=[5] * 300), C.INVALID_ARGUMENT, "300 stop_token_ids"),
    Case("negative entropy bound", req("a", entropy_bound=-1.0), C.INVALID_ARGUMENT, "entropy_bound"),
    Case("NaN entropy bound", req("a", entropy_bound=math.nan), C.INVALID_ARGUMENT, "entropy_bound"),
    Case("t_min above t_max", req("a", t_min=0.9, t_max=0.2), C.INVALID_ARGUMENT, "t_min <= t_max"),
    Case("infinite t_max", req("a", t_max=math.inf), C.INVALID_ARGUMENT, "t_max"),
    Case("0 denoising steps", req("a", max_denoising_steps=0), C.INVALID_ARGUMENT, "max_denoising_steps"),
    Case("10**9 denoising steps", req("a", max_denoising_steps=10**9), C.INVALID_ARGUMENT, "max_denoising_steps"),
    Case("negative confidence threshold", req("a", confidence_threshold=-0.5), C.INVALID_ARGUMENT,
         "confidence_threshold"),
    Case("stability threshold 10**6", req("a", stability_threshold=10**6), C.INVALID_ARGUMENT,
         "stability_threshold"),
    Case("request_id of 300 characters", req("a", request_id="r" * 300), C.INVALID_ARGUMENT,
         "request_id has 300"),
    Case("request over the cap, stream", req("a", max_new_tokens=1000), C.INVALID_ARGUMENT, "limit of 64",
         stream=True),
]


def _send(client: Client, stack, case: Case) -> grpc.RpcError | None:
    if isinstance(case.send, bytes):
        method = "/dgserve.v1.DGServe/GenerateStream" if case.stream else "/dgserve.v1.DGServe/Generate"
        raw = (client.channel.unary_stream if case.stream else client.channel.unary_unary)(method)
        md = [("authorization", f"Bearer {TOKEN}")]
        _, err = call(lambda: list(raw(case.send, timeout=30, metadata=md)) if case.stream
                      else raw(case.send, timeout=30, metadata=md))
        return err
    if case.stream:
        _, err = call(lambda: list(client.stream(case.send, timeout=30)))
        return err
    _, err = call(client.generate, case.send, timeout=30)
    return err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_documented_code_and_a_message(client, stack, case):
    err = _send(client, stack, case)
    assert err is not None, f"{case.name}: accepted"
    assert (err.code(), case.match in err.details()) == (case.code, True), (case.name, err.code(), err.details())
    assert "Traceback" not in err.details() and 'File "' not in err.details()


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


def test_hostile_but_valid_requests_are_served(client):
    """Unicode oddities, control characters, special-token text and unknown fields are data, not errors."""
    for prompt in ("\x00\x01\x1b[2J", "\u202eevil\u202c", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂" * 20, "<|turn>model\n<turn|>", " " * 50):
        r = client.generate(req(prompt, max_new_tokens=2), timeout=60)
        assert r.backend == pb.BACKEND_DIFFUSION and r.usage.completion_tokens >= 1, prompt
    raw = client.channel.unary_unary("/dgserve.v1.DGServe/Generate")
    body = GOOD + field_bytes(99, b"unknown field") + field_varint(98, 7)  # proto3 ignores unknown fields
    r = pb.GenerateResponse.FromString(raw(body, timeout=60, metadata=[("authorization", f"Bearer {TOKEN}")]))
    assert r.usage.completion_tokens >= 1
    r = client.generate(req("seed", max_new_tokens=2, seed=2**64 - 1), timeout=60)
    assert r.usage.completion_tokens >= 1


def test_deadlines_already_passed_or_too_short(client):
    for timeout in (0.0, 0.001):
        _, err = call(client.generate, req("late"), timeout=timeout)
        assert err is not None and err.code() == C.DEADLINE_EXCEEDED
    t0 = time.monotonic()
    slow = req("slow", max_new_tokens=64, max_denoising_steps=4096, confidence_threshold=0.0, routing="diffusion")
    _, err = call(client.generate, slow, timeout=0.5)
    assert err is not None and err.code() == C.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
    info = wait_idle(client)  # the aborted request left the engine
    assert all(r.in_flight == 0 and r.engine_in_flight <= 0 for b in info.backends for r in b.replicas)


def test_unknown_methods_and_services(client):
    md = [("authorization", f"Bearer {TOKEN}")]
    _, err = call(client.channel.unary_unary("/dgserve.v1.DGServe/Nope"), b"", timeout=10, metadata=md)
    assert err.code() == C.UNIMPLEMENTED
    _, err = call(client.channel.unary_unary("/no.Such/Service"), b"", timeout=10, metadata=md)
    assert err.code() == C.UNIMPLEMENTED
    _, err = call(client.health, "no.such.Service")
    assert err.code() == C.NOT_FOUND


# --- authentication on the real stack ----------------------------------------------------------------

def test_token_checked_at_the_front_and_again_by_the_router(stack):
    with stack.client(token=None) as anon:
        for fn in (lambda: anon.generate(req("x"), timeout=10), lambda: anon.info(timeout=10),
                   lambda: list(anon.stream(req("x"), timeout=10))):
            _, err = call(fn)
            assert err is not None and err.code() == C.UNAUTHENTICATED and "Bearer" in err.details()
        assert anon.health() == "SERVING"  # probes need no token
    with stack.client(token="not-the-token-0123456789") as wrong:
        _, err = call(wrong.generate, req("x"), timeout=10)
        assert err.code() == C.UNAUTHENTICATED
    # Serve's proxy behind the front is reachable on its own port: the router refuses there too
    with Client(stack.proxy) as direct:
        _, err = call(direct.generate, req("x"), timeout=10)
        assert err is not None and err.code() == C.UNAUTHENTICATED and "Traceback" not in err.details()
        assert direct.health() == "SERVING"
    with Client(stack.proxy, token=TOKEN) as direct:
        assert direct.generate(req("x", max_new_tokens=2), timeout=60).usage.completion_tokens >= 1


def test_plaintext_and_unknown_clients_cannot_connect(stack):
    for kwargs in ({"credentials": None},
                   {"credentials": channel_credentials(str(stack.pki.ca))},  # no client certificate
                   {"credentials": channel_credentials(str(stack.pki.ca), str(stack.pki.rogue_client.cert),
                                                       str(stack.pki.rogue_client.key))}):
        with stack.client(**kwargs) as c:
            _, err = call(c.generate, req("x"), timeout=5)
            assert err is not None and err.code() == C.UNAVAILABLE, kwargs


# --- fuzz ----------------------------------------------------------------------------------------------

small = st.integers(0, 4)
huge_u32 = st.integers(2**31, 2**32 - 1)
texts = st.text(max_size=60)
any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)
vocab = st.integers(0, 511)  # the tiny checkpoint's vocabulary


def rarely(strategy, empty, p: int = 5):
    """``strategy`` one time in ``p``, else ``empty``: most requests stay valid enough to reach the engine."""
    return st.integers(0, p - 1).flatmap(lambda i: strategy if i == 0 else st.just(empty))


@st.composite
def requests(draw) -> tuple[pb.GenerateRequest, bool]:
    """Structured requests: mostly plausible, each field hostile now and then (bad UTF-8 cannot be built here:
    the raw-bytes fuzz and the table send it)."""
    r = pb.GenerateRequest()
    shape = draw(st.sampled_from(["prompt"] * 9 + ["messages"] * 9 + ["both", "neither"]))
    if shape in ("prompt", "both"):
        r.prompt = draw(rarely(texts, "x", 10) | st.text(min_size=1, max_size=60))
    roles = st.sampled_from(["user", "system", "assistant"]) | rarely(st.sampled_from(["", "tool"]) | texts, "user")
    if shape in ("messages", "both"):
        for role, content in draw(st.lists(st.tuples(roles, texts), min_size=1, max_size=3)):
            r.messages.add(role=role, content=content)
    if draw(st.integers(0, 4)):
        r.max_new_tokens = draw(st.one_of(st.integers(1, 4), rarely(st.one_of(st.just(0), st.integers(60, 70),
                                                                              huge_u32), 2)))
    if draw(st.booleans()):
        r.seed = draw(st.integers(0, 2**64 - 1))
    for name, good in (("entropy_bound", st.floats(0.0625, 10, width=32)), ("t_min", st.floats(0, 0.5, width=32)),
                       ("t_max", st.floats(0.5, 2, width=32)), ("confidence_threshold", st.floats(0, 1, width=32)),
                       ("temperature", st.floats(0, 2, width=32)), ("top_p", st.floats(0, 1, width=32))):
        if draw(st.integers(0, 4)) == 0:
            setattr(r.sampling, name, draw(st.one_of(good, rarely(any_float, 0.5, 3))))
    if draw(st.integers(0, 3)) == 0:
        r.sampling.max_denoising_steps = draw(st.one_of(st.integers(1, 4), rarely(st.one_of(
            st.just(0), st.integers(4097, 2**32 - 1)), 1, 3)))
    if draw(st.integers(0, 4)) == 0:
        r.sampling.stability_threshold = draw(st.one_of(small, rarely(st.integers(65, 2**32 - 1), 1, 3)))
    r.stop_token_ids.extend(draw(rarely(st.lists(st.one_of(vocab, rarely(huge_u32, 5, 3)), max_size=3), [])))
    pins = draw(rarely(st.lists(st.tuples(st.one_of(small, rarely(huge_u32, 0, 3)),
                                          st.one_of(vocab, rarely(huge_u32, 5, 3))), max_size=3), []))
    for pos, tok in pins:
        r.pinned.add(position=pos, token_id=tok)
    if draw(st.integers(0, 6)) == 0:
        r.infill.prefix = draw(texts)
        r.infill.suffix = draw(st.text(max_size=3))
    r.routing = draw(st.sampled_from([0] * 10 + [1] * 5 + [2] * 2 + [3, -1, 2**31 - 1]))
    r.stream_drafts = draw(st.booleans())
    if draw(st.booleans()):
        r.request_id = draw(rarely(st.text(max_size=300), "", 2))
    return r, draw(st.booleans())


FUZZ_SEEN: dict[str, int] = {}


def _predicted(r: pb.GenerateRequest) -> grpc.StatusCode | None:
    """What the router's validation alone says (None: it passes; the backend decides the rest)."""
    try:
        plan_request(r, fallback=True, overflow=True, limits=LimitSettings(**LIMITS))
    except ServingError as e:
        return e.code
    return None


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=requests())
def test_fuzz_never_internal(client, case):
    r, stream = case
    if r.ByteSize() > LIMITS["max_message_bytes"]:
        return
    if stream:
        _, err = call(lambda: list(client.stream(r, timeout=30)))
    else:
        _, err = call(client.generate, r, timeout=30)
    code = C.OK if err is None else err.code()
    FUZZ_SEEN[code.name] = FUZZ_SEEN.get(code.name, 0) + 1
    assert code in DOCUMENTED_CODES and code not in (C.INTERNAL, C.UNKNOWN), (r, code, err and err.details())
    if err is not None:
        assert err.details() and "Traceback" not in err.details(), err.details()
    predicted = _predicted(r)
    if predicted is not None:  # the server refuses exactly what the router's validation refuses
        assert code == predicted, (r, code, predicted, err and err.details())


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(st.binary(max_size=256), st.builds(lambda a, b: GOOD[:a] + b + GOOD[a:],
                                                         st.integers(0, len(GOOD)), st.binary(max_size=16))))
def test_fuzz_raw_bytes_never_internal(client, body):
    raw = client.channel.unary_unary("/dgserve.v1.DGServe/Generate")
    _, err = call(raw, body, timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")])
    code = C.OK if err is None else err.code()
    FUZZ_SEEN["raw:" + code.name] = FUZZ_SEEN.get("raw:" + code.name, 0) + 1
    assert code in DOCUMENTED_CODES and code not in (C.INTERNAL, C.UNKNOWN), (body, code, err and err.details())


def test_after_the_fuzz_the_server_is_healthy_idle_and_unchanged(client, stack):
    """Runs after the fuzz tests (file order): no replica restarted, nothing left in flight, still serving."""
    info = wait_idle(client)
    assert client.health() == "SERVING"
    assert all(r.in_flight == 0 and r.engine_in_flight <= 0 for b in info.backends for r in b.replicas), info
    assert info.queued == 0 and all(b.router_in_flight == 0 for b in info.backends)
    # the same replicas as when the module started: none crashed and was replaced
    assert replica_ids(info) == stack.initial_replicas
    assert all(r.requests > 0 for b in info.backends for r in b.replicas)
    r = client.generate(req("still here", max_new_tokens=4), timeout=60)
    assert r.backend == pb.BACKEND_DIFFUSION and r.usage.completion_tokens >= 1
    print(f"fuzz outcomes: {dict(sorted(FUZZ_SEEN.items()))}")
    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="dgserve.v1.DGServe"), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
