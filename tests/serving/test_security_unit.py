"""Security settings and checks without a server: the config contract, explicit plaintext, request limits
in the router's validation, bearer-token parsing and the router's own token check."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from pydantic import ValidationError

from dgserve.serving.client import make_request
from dgserve.serving.config import AppConfig, LimitSettings, SecurityConfig
from dgserve.serving.errors import ServingError
from dgserve.serving.router import plan_request
from dgserve.serving.security import (
    ClientLimiter,
    InsecureTransportError,
    TokenFile,
    bearer_token,
    check_transport,
    client_identity,
)
from dgserve.v1 import dgserve_pb2 as pb

BASE = {"promised_context_length": 2048, "diffusion": {"engine": {"model": "m"}}}
TLS = {"cert_file": "/tls/tls.crt", "key_file": "/tls/tls.key"}


def test_front_moves_serves_proxy_to_the_internal_port():
    plain = AppConfig.model_validate(BASE)
    assert plain.serve_grpc_options()["port"] == 9000 and not plain.security.front
    cfg = AppConfig.model_validate(BASE | {"security": {"tls": TLS, "proxy_port": 9001}})
    assert cfg.serve_grpc_options()["port"] == 9001 and cfg.router.grpc_port == 9000 and cfg.security.front
    assert cfg.security.transport == "tls"
    mtls = SecurityConfig(tls=TLS | {"client_ca_file": "/tls/ca.crt"}, proxy_port=9001)
    assert mtls.transport == "mtls"


@pytest.mark.parametrize("security, match", [
    ({"tls": TLS}, "needs security.proxy_port"),
    ({"allow_plaintext": True, "proxy_port": 9000}, "equals router.grpc_port"),
    ({"limits": {"max_message_bytes": 10}}, "max_message_bytes"),
    ({"limits": {"max_concurrent_per_client": 0}}, "max_concurrent_per_client"),
    ({"auth": {"token": "inline"}}, "token"),  # the token itself never goes into the config
])
def test_bad_security_settings_are_refused(security, match):
    with pytest.raises(ValidationError, match=match):
        AppConfig.model_validate(BASE | {"security": security})


def test_plaintext_only_when_explicitly_allowed():
    with pytest.raises(InsecureTransportError, match="allow_plaintext"):
        check_transport(SecurityConfig())
    assert check_transport(SecurityConfig(allow_plaintext=True)) == "plaintext"
    assert check_transport(SecurityConfig(tls=TLS, proxy_port=9001)) == "tls"


def limited(**kw):
    return LimitSettings(**kw)


@pytest.mark.parametrize("req, limits, match", [
    (make_request("x" * 101), limited(max_prompt_chars=100), "101 characters exceeds the limit of 100"),
    (make_request(messages=[("user", "x" * 60), ("user", "y" * 40)]), limited(max_prompt_chars=100),
     "prompt of 108 characters"),  # roles count too
    (make_request(messages=[("user", "a")] * 3), limited(max_messages=2), "3 chat messages exceed the limit of 2"),
    (make_request("x", max_new_tokens=65), limited(max_new_tokens=64), "max_new_tokens 65 exceeds the limit of 64"),
    (make_request("x", stop_token_ids=list(range(300))), limited(), "300 stop_token_ids"),
    (make_request("x", request_id="r" * 300), limited(), "request_id has 300 characters"),
    (make_request(messages=[("u" * 100, "hi")]), limited(), "role has 100 characters"),
])
def test_request_limits_are_invalid_argument_naming_the_limit(req, limits, match):
    with pytest.raises(ServingError, match=match) as info:
        plan_request(req, fallback=True, overflow=True, limits=limits)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_requests_within_the_limits_pass():
    plan_request(make_request("x" * 100, max_new_tokens=64), fallback=True, overflow=True,
                 limits=limited(max_prompt_chars=100, max_new_tokens=64))


@pytest.mark.parametrize("metadata, token", [
    ([("authorization", "Bearer abc")], "abc"),
    ([("Authorization", "bearer   abc  ")], "abc"),
    ([("authorization", "Basic abc")], None),
    ([("authorization", "Bearer")], None),
    ([("x-other", "Bearer abc")], None),
    ([], None),
    (None, None),
])
def test_bearer_token_parsing(metadata, token):
    assert bearer_token(metadata) == token


def test_token_file_accepts_only_its_tokens(tmp_path):
    path = tmp_path / "token"
    path.write_text("first-token-0123456789\n\nsecond-token-0123456789\n")
    tokens = TokenFile(path)
    assert tokens.accepts("first-token-0123456789") and tokens.accepts("second-token-0123456789")
    for bad in (None, "", "first-token-012345678", "first-token-01234567890", "FIRST-TOKEN-0123456789"):
        assert not tokens.accepts(bad), bad
    with pytest.raises(ServingError) as info:
        tokens.check([("authorization", "Bearer nope")])
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    path.write_text("")  # a rotation gone wrong keeps the last good tokens
    tokens._recheck_s = 0.0
    assert tokens.accepts("first-token-0123456789")


class _Ctx:
    def __init__(self, md=(), peer="ipv4:10.1.2.3:5555", auth=None):
        self.md, self._peer, self._auth = list(md), peer, auth or {}
        self.code = self.details = None

    def invocation_metadata(self):
        return self.md

    def peer(self):
        return self._peer

    def auth_context(self):
        return self._auth

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, md):
        pass


def test_client_identity_and_limiter():
    assert client_identity(_Ctx()) == "ip:10.1.2.3"
    assert client_identity(_Ctx(peer="ipv6:[::1]:4000")) == "ip:::1"
    assert client_identity(_Ctx(auth={"x509_common_name": [b"svc-a"]})) == "cn:svc-a"
    lim = ClientLimiter(2)
    assert lim.acquire("a") and lim.acquire("a") and not lim.acquire("a") and lim.acquire("b")
    lim.release("a")
    assert lim.acquire("a") and lim.in_flight("a") == 2
    assert all(ClientLimiter(None).acquire("a") for _ in range(1000))


def test_router_checks_the_token_itself(tmp_path):
    """Behind the front, Serve's proxy is reachable on its own port: the router checks the token too."""
    from test_serving_router import FINAL, _Handle, make_router

    from dgserve.serving.messages import Chunk

    path = tmp_path / "token"
    path.write_text("router-token-0123456789\n")
    router = make_router(_Handle([[Chunk(0, "hi", (5,), 1), FINAL]]))
    router._tokens = TokenFile(path)
    ctx = _Ctx()
    assert asyncio.run(router.Generate(make_request("x"), ctx)) == pb.GenerateResponse()
    assert ctx.code == grpc.StatusCode.UNAUTHENTICATED and router.handles["diffusion"].calls == 0
    info_ctx = _Ctx()
    asyncio.run(router.GetModelInfo(pb.GetModelInfoRequest(), info_ctx))
    assert info_ctx.code == grpc.StatusCode.UNAUTHENTICATED
    ok = _Ctx([("authorization", "Bearer router-token-0123456789")])
    assert asyncio.run(router.Generate(make_request("x"), ok)).text == "hi" and ok.code is None


def test_dgserve_serve_refuses_implicit_plaintext_before_starting_anything(tmp_path, monkeypatch, capsys):
    import signal

    from dgserve.cli import main

    cfg = tmp_path / "app.yaml"
    cfg.write_text("promised_context_length: 1024\ndiffusion: {engine: {model: /nonexistent}}\n")
    monkeypatch.setenv("DGSERVE_STATE_DIR", str(tmp_path / "state"))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["serve", "--config", str(cfg)]) == 1
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert "plaintext is not allowed" in err and "allow_plaintext: true" in err
    assert not (tmp_path / "state" / "ray").exists()  # refused before Ray started
