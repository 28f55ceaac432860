"""TLS on the HTTP listener: a real handshake, and client certificates when asked for."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import MakeServer, MqfastProcess


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool = False,
    san: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "ca", _cert("test-ca", ca_key, "test-ca", ca_key, ca=True), ca_key)
    for name, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d / name, _cert(name, key, "test-ca", ca_key, san=san), key)
    return d


def https(srv: MqfastProcess, pki: Path, client_cert: bool, path: str = "/health/ready") -> int:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client_cert:
        ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def start_tls(make_server: MakeServer, pki: Path, **env: str) -> MqfastProcess:
    srv = make_server(
        start=False,
        MESSAGE_QUEUE_TLS_CERT=str(pki / "server.crt"),
        MESSAGE_QUEUE_TLS_KEY=str(pki / "server.key"),
        **env,
    )
    # started by hand: readiness is checked over TLS
    assert srv.log_path is not None
    log = open(srv.log_path, "ab")  # kept open for the child's lifetime
    srv.proc = subprocess.Popen(
        [sys.executable, "-m", "mqfast.cli", "serve"], env=srv.env, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if https(srv, pki, client_cert=True) == 200:
                return srv
        except (OSError, ssl.SSLError):
            time.sleep(0.05)
    raise AssertionError(f"TLS server did not become ready: {srv.logs()}")


def test_https_handshake_and_plain_http_is_refused(make_server: MakeServer, pki: Path) -> None:
    srv = start_tls(make_server, pki)
    assert https(srv, pki, client_cert=False, path="/health") == 200
    with pytest.raises((OSError, http.client.HTTPException)):
        plain = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        plain.request("GET", "/health")
        plain.getresponse()


def test_required_client_certificate(make_server: MakeServer, pki: Path) -> None:
    srv = start_tls(
        make_server,
        pki,
        MESSAGE_QUEUE_TLS_CLIENT_CA=str(pki / "ca.crt"),
        MESSAGE_QUEUE_TLS_CLIENT_AUTH="required",
    )
    assert https(srv, pki, client_cert=True) == 200
    with pytest.raises((OSError, ssl.SSLError, http.client.HTTPException)):
        https(srv, pki, client_cert=False)


def test_unreadable_certificate_stops_start_up(make_server: MakeServer, tmp_path: Path) -> None:
    srv = make_server(
        start=False,
        MESSAGE_QUEUE_TLS_CERT=str(tmp_path / "missing.crt"),
        MESSAGE_QUEUE_TLS_KEY=str(tmp_path / "missing.key"),
    )
    out = subprocess.run(
        [sys.executable, "-m", "mqfast.cli", "serve"],
        env=srv.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "MESSAGE_QUEUE_TLS_CERT" in out.stderr + out.stdout
