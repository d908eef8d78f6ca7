"""Security of what the operator renders: the CR's TLS / mutual TLS / token Secrets reach the gRPC front and
the app as mounted files (never environment variables), plaintext only with allowPlaintext, the front's
arguments mean exactly the app's ``security`` section (parsed by the real ``dgserve front`` parser), and
every rendered container runs as non-root with a read-only root filesystem and no privilege escalation."""

from __future__ import annotations

import argparse
import copy

import pytest
import yaml

from dgserve.operator import names
from dgserve.operator.errors import InvalidSpecError
from dgserve.operator.render import Owner, build_app_config, build_rayservice, front_args, parse_spec, render
from dgserve.serving.config import AppConfig
from operator_testlib import REPO_ROOT, rayservice_schema, strict, validate

OWNER = Owner("gemma", "ml", "uid-1")
MODEL = {"pvc": {"claimName": "models", "path": "dg"}}
MTLS = {"tls": {"secretName": "grpc-tls", "clientAuth": "Require", "clientCaSecretName": "clients-ca"},
        "auth": {"tokenSecret": {"name": "grpc-token", "key": "t"}},
        "limits": {"maxMessageBytes": 1048576, "maxNewTokens": 2048, "maxPromptChars": 100000,
                   "maxConcurrentPerClient": 8}}


def rendered(security, **over):
    spec = parse_spec({"model": copy.deepcopy(MODEL), "security": security,
                       "fallback": {"type": "InCluster", "contextLength": 262144}, **over})
    return spec, build_rayservice(spec, OWNER)


def pods(rs):
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def by_name(pod, name):
    (c,) = [c for c in pod["containers"] if c["name"] == name]
    return c


def front_parser():
    from dgserve.serving.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser


def test_mutual_tls_and_token_secrets_become_files_for_the_front_and_the_router():
    spec, rs = rendered(MTLS)
    validate(rs, strict(rayservice_schema()))
    app = AppConfig.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"])
    sec = app.security
    assert sec.transport == "mtls" and sec.tls.require_client_cert and not sec.allow_plaintext
    assert sec.tls.cert_file == f"{names.TLS_DIR}/tls.crt" and sec.tls.client_ca_file == f"{names.CLIENT_CA_DIR}/ca.crt"
    assert sec.auth.token_file == f"{names.AUTH_DIR}/{names.AUTH_TOKEN_FILE}"
    assert (sec.limits.max_message_bytes, sec.limits.max_new_tokens, sec.limits.max_prompt_chars,
            sec.limits.max_concurrent_per_client) == (1048576, 2048, 100000, 8)
    assert yaml.safe_load(rs["spec"]["serveConfigV2"])["grpc_options"]["port"] == sec.proxy_port != spec.grpc_port
    for pod in pods(rs):
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["tls"]["secret"]["secretName"] == "grpc-tls"
        assert vols["client-ca"]["secret"] == {"secretName": "clients-ca", "defaultMode": 0o440,
                                               "items": [{"key": "ca.crt", "path": "ca.crt"}]}
        assert vols["auth-token"]["secret"]["items"] == [{"key": "t", "path": names.AUTH_TOKEN_FILE}]
        front = by_name(pod, names.FRONT_CONTAINER)
        assert front["ports"] == [{"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"}]
        assert {m["name"] for m in front["volumeMounts"]} == {"tls", "client-ca", "auth-token", "tmp"}
        ray = pod["containers"][0]  # KubeRay drives the first container
        assert ray["name"].startswith("ray-")
        assert {m["name"] for m in ray["volumeMounts"]} >= {"auth-token", "tmp"}  # the router re-checks tokens
        assert "tls" not in {m["name"] for m in ray["volumeMounts"]}  # the key stays in the front
        assert {"name": "grpc-proxy", "containerPort": sec.proxy_port, "protocol": "TCP"} in ray["ports"]
        env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
        assert not any("TOKEN" in k or "TLS" in k for k in env)  # secrets are files, never environment


def test_front_arguments_mean_the_apps_security_section():
    """Parse the rendered args with the real `dgserve front` parser: same ports, files and limits."""
    for security in (MTLS, {"tls": {"secretName": "s", "clientAuth": "Optional"}}, {"allowPlaintext": True}):
        spec, rs = rendered(security)
        sec = build_app_config(spec).security
        front = by_name(pods(rs)[1], names.FRONT_CONTAINER)
        assert front["command"] == ["dgserve", "front"] and front["args"] == front_args(spec)
        a = front_parser().parse_args(["front", *front["args"]])
        assert (a.port, a.upstream) == (spec.grpc_port, f"127.0.0.1:{sec.proxy_port}")
        assert a.max_message_bytes == sec.limits.max_message_bytes
        assert (a.max_concurrent_per_client or None) == sec.limits.max_concurrent_per_client
        assert a.allow_plaintext == sec.allow_plaintext
        assert (a.tls_cert, a.tls_key) == ((sec.tls.cert_file, sec.tls.key_file) if sec.tls else (None, None))
        assert a.tls_client_ca == (sec.tls.client_ca_file if sec.tls else None)
        optional = bool(sec.tls and sec.tls.client_ca_file and not sec.tls.require_client_cert)
        assert a.tls_client_cert_optional == optional
        assert a.token_file == (sec.auth.token_file if sec.auth else None)


def test_plaintext_only_when_explicitly_allowed():
    for raw in ({"model": MODEL}, {"model": MODEL, "security": {}}, {"model": MODEL, "security": {"auth": {
            "tokenSecret": {"name": "t"}}}}):
        with pytest.raises(InvalidSpecError, match="allowPlaintext: true"):
            parse_spec(raw)
    spec, rs = rendered({"allowPlaintext": True})
    assert build_app_config(spec).security.transport == "plaintext"
    assert "--allow-plaintext" in by_name(pods(rs)[0], names.FRONT_CONTAINER)["args"]
    spec, rs = rendered({"tls": {"secretName": "s"}})
    assert not any("--allow-plaintext" in by_name(p, names.FRONT_CONTAINER)["args"] for p in pods(rs))


def test_proxy_port_never_collides_with_the_public_port():
    spec, _ = rendered({"allowPlaintext": True}, grpcPort=names.PROXY_PORT)
    sec = build_app_config(spec).security
    assert sec.proxy_port == names.PROXY_PORT_ALT and spec.grpc_port == names.PROXY_PORT


def every_container(rs):
    for pod in pods(rs):
        yield pod, [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("security", [MTLS, {"allowPlaintext": True}])
def test_every_container_is_non_root_read_only_and_unprivileged(security):
    _, rs = rendered(security, model={"huggingFace": {"repo": "google/diffusiongemma-26B-A4B-it"}})
    seen = 0
    for pod, containers in every_container(rs):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in containers:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["privileged"] is False and sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], c["name"]  # the only writable path
            seen += 1
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert seen >= 7  # head, diffusion and fallback: Ray container + front each, plus the model download


def test_the_example_serves_mutual_tls_with_a_token():
    (doc,) = yaml.safe_load_all((REPO_ROOT / "deploy/diffusiongemma.yaml").read_text())
    doc["metadata"]["namespace"] = "default"
    (rs,) = render(doc)
    sec = AppConfig.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]).security
    assert sec.transport == "mtls" and sec.auth is not None and not sec.allow_plaintext
