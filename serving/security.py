"""Security primitives of the gRPC endpoint: transport check, TLS credentials, bearer tokens, request
limits and the per-client concurrency cap (``docs/security.md``).

Used by the front (``serving/front.py``: TLS termination, token, per-client cap, message size) and
by the router (token again, request limits), so a caller that reaches Serve's gRPC proxy directly
still needs the token and still meets the limits.

* Plaintext is never a silent default: :func:`check_transport` refuses an endpoint without TLS unless
  ``security.allow_plaintext`` is set.
* Tokens are compared in constant time (:func:`hmac.compare_digest` over SHA-256 digests, so neither
  the content nor the length of an accepted token leaks through timing), and re-read from their file
  when it changes (a rotated Kubernetes Secret).
* TLS certificates are re-read when their files change (``grpc.dynamic_ssl_server_credentials``), so a
  rotated ``kubernetes.io/tls`` Secret takes effect for new connections without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from dgserve.engine.errors import ConfigError

from .config import AppConfig, LimitSettings, SecurityConfig, TLSSettings
from .errors import ServingError

log = logging.getLogger("dgserve.serving")

AUTH_METADATA_KEY = "authorization"
BEARER = "bearer"
MIN_TOKEN_CHARS = 16
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
"""Methods that never need a token: Kubernetes probes and load balancers call them."""
MAX_STOP_TOKEN_IDS = 256
MAX_PINNED = 65_536
MAX_REQUEST_ID_CHARS = 256
MAX_ROLE_CHARS = 64


class InsecureTransportError(ConfigError):
    """The endpoint would serve plaintext without ``security.allow_plaintext``, or its TLS files are unusable."""


def require_transport(tls: TLSSettings | None, allow_plaintext: bool) -> None:
    """Raises InsecureTransportError for plaintext that was not explicitly allowed."""
    if tls is None and not allow_plaintext:
        raise InsecureTransportError(
            "the gRPC endpoint has no TLS (security.tls) and plaintext is not allowed: set security.tls "
            "(cert_file, key_file[, client_ca_file]) and security.proxy_port, or security.allow_plaintext: true")


def check_transport(security: SecurityConfig) -> str:
    """``"tls"``, ``"mtls"`` or ``"plaintext"``; raises InsecureTransportError for implicit plaintext."""
    require_transport(security.tls, security.allow_plaintext)
    return security.transport


# --- bearer tokens -----------------------------------------------------------------------------------

def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry (None if absent or malformed)."""
    for key, value in metadata or ():
        if key.lower() != AUTH_METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = str(value).strip().partition(" ")
        if scheme.lower() == BEARER and token.strip():
            return token.strip()
        return None
    return None


class TokenFile:
    """The accepted bearer tokens, read from a file (one per line) and re-read when its mtime or size changes
    (checked at most every ``recheck_s``). An empty, short or unreadable file refuses to start; a file that
    turns bad later keeps the last good tokens (and logs it)."""

    def __init__(self, path: str | os.PathLike[str], *, recheck_s: float = 1.0) -> None:
        self.path = Path(path)
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._digests = self._read()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[float, int]:
        try:
            st = self.path.stat()
        except OSError as e:
            raise InsecureTransportError(f"auth token file {self.path}: {e.strerror or e}") from e
        return st.st_mtime, st.st_size

    def _read(self) -> tuple[bytes, ...]:
        try:
            lines = [ln.strip() for ln in self.path.read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise InsecureTransportError(f"auth token file {self.path} is unreadable: {e}") from e
        tokens = [ln for ln in lines if ln]
        if not tokens:
            raise InsecureTransportError(f"auth token file {self.path} holds no token")
        short = [i for i, t in enumerate(tokens) if len(t) < MIN_TOKEN_CHARS]
        if short:
            raise InsecureTransportError(f"auth token file {self.path}: token on line {short[0] + 1} is shorter "
                                         f"than {MIN_TOKEN_CHARS} characters")
        return tuple(_digest(t) for t in tokens)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._recheck_s:
            return
        with self._lock:
            self._checked = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._digests, self._stamp = self._read(), stamp
                    log.info("auth: re-read %d token(s) from %s", len(self._digests), self.path)
            except InsecureTransportError as e:
                log.error("auth: keeping the previous tokens: %s", e)

    def accepts(self, token: str | None) -> bool:
        """Constant-time check against every accepted token (no early exit, fixed-length digests)."""
        self._maybe_reload()
        presented = _digest(token or "")
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(presented, d)
        return ok and token is not None

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Raises ServingError(UNAUTHENTICATED) unless the metadata carries an accepted bearer token."""
        token = bearer_token(metadata)
        if not self.accepts(token):
            what = "no bearer token" if token is None else "the bearer token is not accepted"
            raise ServingError(grpc.StatusCode.UNAUTHENTICATED,
                               f"{what}: send metadata '{AUTH_METADATA_KEY}: Bearer <token>'")


def token_file(security: SecurityConfig) -> TokenFile | None:
    return TokenFile(security.auth.token_file) if security.auth is not None else None


# --- request limits ------------------------------------------------------------------------------------

def check_request_limits(msg: Any, limits: LimitSettings) -> None:
    """Raises ServingError(INVALID_ARGUMENT) naming the value and the limit (``msg``: a GenerateRequest)."""
    def refuse(text: str) -> ServingError:
        return ServingError(grpc.StatusCode.INVALID_ARGUMENT, text)

    if len(msg.messages) > limits.max_messages:
        raise refuse(f"{len(msg.messages)} chat messages exceed the limit of {limits.max_messages} "
                     "(security.limits.max_messages)")
    chars = len(msg.prompt) + len(msg.infill.prefix) + len(msg.infill.suffix) + sum(
        len(m.content) + len(m.role) for m in msg.messages)
    if chars > limits.max_prompt_chars:
        raise refuse(f"prompt of {chars} characters exceeds the limit of {limits.max_prompt_chars} "
                     "(security.limits.max_prompt_chars)")
    for i, m in enumerate(msg.messages):
        if len(m.role) > MAX_ROLE_CHARS:
            raise refuse(f"messages[{i}].role has {len(m.role)} characters, more than {MAX_ROLE_CHARS}")
    if limits.max_new_tokens is not None and msg.HasField("max_new_tokens") \
            and msg.max_new_tokens > limits.max_new_tokens:
        raise refuse(f"max_new_tokens {msg.max_new_tokens} exceeds the limit of {limits.max_new_tokens} "
                     "(security.limits.max_new_tokens)")
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise refuse(f"{len(msg.stop_token_ids)} stop_token_ids exceed the limit of {MAX_STOP_TOKEN_IDS}")
    if len(msg.pinned) > MAX_PINNED:
        raise refuse(f"{len(msg.pinned)} pinned tokens exceed the limit of {MAX_PINNED}")
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise refuse(f"request_id has {len(msg.request_id)} characters, more than {MAX_REQUEST_ID_CHARS}")


# --- per-client concurrency ------------------------------------------------------------------------------

def client_identity(context: Any) -> str:
    """Who a call comes from: ``cn:<common name>`` of a verified client certificate, else ``ip:<address>``."""
    try:
        auth = context.auth_context() or {}
    except Exception:
        auth = {}
    cn = auth.get("x509_common_name") or []
    if cn:
        return "cn:" + cn[0].decode(errors="replace")
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return "ip:" + host.strip("[]")
    return peer


class ClientLimiter:
    """In-flight requests per client; ``acquire`` refuses beyond the cap (None: unlimited). Event-loop only."""

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self._in_flight: dict[str, int] = {}

    def in_flight(self, client: str) -> int:
        return self._in_flight.get(client, 0)

    def acquire(self, client: str) -> bool:
        n = self._in_flight.get(client, 0)
        if self.cap is not None and n >= self.cap:
            return False
        self._in_flight[client] = n + 1
        return True

    def release(self, client: str) -> None:
        n = self._in_flight.get(client, 0) - 1
        if n > 0:
            self._in_flight[client] = n
        else:
            self._in_flight.pop(client, None)


# --- TLS credentials -------------------------------------------------------------------------------------

def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InsecureTransportError(f"TLS {what} {path}: {e.strerror or e}") from e
    if b"-----BEGIN" not in data:
        raise InsecureTransportError(f"TLS {what} {path} is not PEM")
    return data


class _CertFiles:
    """The TLS files and their mtimes; ``fetch`` returns a new configuration when one of them changed."""

    def __init__(self, tls: TLSSettings) -> None:
        self.tls = tls
        self._stamp = self._stat()

    def _paths(self) -> Sequence[str]:
        return [p for p in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file) if p]

    def _stat(self) -> tuple[float, ...]:
        out = []
        for p in self._paths():
            try:
                out.append(os.stat(p).st_mtime)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    def configuration(self) -> Any:
        t = self.tls
        cert = _read(t.cert_file, "certificate file")
        key = _read(t.key_file, "key file")
        ca = _read(t.client_ca_file, "client CA file") if t.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> Any:
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        try:
            config = self.configuration()
        except InsecureTransportError as e:  # half-written rotation: keep serving the old certificate
            log.error("TLS: keeping the previous certificate: %s", e)
            return None
        self._stamp = stamp
        log.info("TLS: re-read %s", ", ".join(self._paths()))
        return config


def server_credentials(tls: TLSSettings) -> grpc.ServerCredentials:
    """TLS (mutual TLS with ``client_ca_file``) credentials, re-read when the files change."""
    files = _CertFiles(tls)
    initial = files.configuration()
    require = bool(tls.client_ca_file) and tls.require_client_cert
    return grpc.dynamic_ssl_server_credentials(initial, files.fetch, require_client_authentication=require)


def channel_credentials(ca_file: str | None = None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """Client side: trust ``ca_file`` (None: the system roots); present ``cert_file``/``key_file`` for mTLS."""
    if (cert_file is None) != (key_file is None):
        raise InsecureTransportError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA file") if ca_file else None,
        private_key=_read(key_file, "key file") if key_file else None,
        certificate_chain=_read(cert_file, "certificate file") if cert_file else None)


def endpoint_summary(cfg: AppConfig) -> str:
    """One line for start-up logs: transport, auth, limits."""
    s = cfg.security
    lim = s.limits
    return (f"transport={s.transport} auth={'bearer' if s.auth else 'none'} "
            f"max_message_bytes={lim.max_message_bytes} max_new_tokens={lim.max_new_tokens} "
            f"max_prompt_chars={lim.max_prompt_chars} max_concurrent_per_client={lim.max_concurrent_per_client}")
