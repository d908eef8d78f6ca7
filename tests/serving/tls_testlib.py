"""Certificates the tests generate (``cryptography``): a CA, a server certificate for localhost/127.0.0.1,
client certificates signed by that CA, and a second, untrusted CA with its own client certificate."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path  # trusted CA certificate
    server: Pair  # localhost, 127.0.0.1
    client: Pair  # CN=client-a, signed by ca
    client_b: Pair  # CN=client-b, signed by ca
    rogue_ca: Path  # an unrelated CA
    rogue_client: Pair  # CN=client-a, signed by rogue_ca
    expired_client: Pair  # CN=client-old, signed by ca, expired yesterday


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(cn: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *, server: bool,
          expired: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    start, end = ((now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired
                  else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)))
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca[0].subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(ca[1], hashes.SHA256()), key


def make_pki(folder: Path, *, server_cn: str = "localhost") -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue = _ca("dgserve test CA"), _ca("rogue CA")
    _write(folder / "ca.crt", ca[0])
    _write(folder / "rogue-ca.crt", rogue[0])
    pairs = {}
    for name, cn, issuer, server, expired in (("server", server_cn, ca, True, False),
                                              ("client", "client-a", ca, False, False),
                                              ("client-b", "client-b", ca, False, False),
                                              ("rogue-client", "client-a", rogue, False, False),
                                              ("expired-client", "client-old", ca, False, True)):
        cert, key = _leaf(cn, issuer, server=server, expired=expired)
        _write(folder / f"{name}.crt", cert, key)
        pairs[name] = Pair(folder / f"{name}.crt", folder / f"{name}.key")
    return PKI(ca=folder / "ca.crt", server=pairs["server"], client=pairs["client"], client_b=pairs["client-b"],
               rogue_ca=folder / "rogue-ca.crt", rogue_client=pairs["rogue-client"],
               expired_client=pairs["expired-client"])
