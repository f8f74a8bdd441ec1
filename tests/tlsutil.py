"""Test PKI and TLS backends: throwaway CAs and certificates, and real TLS servers (Trio + ssl).

Certificates are made with ``cryptography`` in the test's tmp_path (ECDSA P-256,
fast to generate); backends are Trio ``serve_ssl_over_tcp`` servers on loopback
that answer HTTP/1.1 with their own name, or echo bytes after an ``ECHO\\n`` line
or a WebSocket upgrade.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import http_get


@dataclass
class CertFiles:
    cert: Path
    key: Path


@dataclass
class Ca:
    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path  # PEM of the CA certificate

    def issue(self, directory: Path, stem: str, names: list[str], *, client: bool = False) -> CertFiles:
        """A leaf certificate for ``names`` (DNS names or IP literals), signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else stem)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        files = CertFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        files.key.chmod(0o600)
        return files


def make_ca(directory: Path, name: str) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}-ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(name, cert, key, path)


@dataclass
class TlsBackendStats:
    server_names: list[str | None] = field(default_factory=list)  # SNI of each handshake
    client_subjects: list[str | None] = field(default_factory=list)  # CN of the client certificate, if any
    handshakes: int = 0
    resumed: int = 0  # handshakes that resumed an earlier session (ticket)
    requests: int = 0
    failed_handshakes: int = 0


@dataclass
class TlsBackend:
    name: str
    port: int
    stats: TlsBackendStats

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def server_context(files: CertFiles, *, client_ca: Path | None = None, stats: TlsBackendStats | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.cert, files.key)
    if client_ca is not None:  # backend mTLS: a client certificate signed by this CA is required
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    if stats is not None:
        def note(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            stats.server_names.append(name)

        ctx.sni_callback = note  # type: ignore[assignment]
    return ctx


async def _serve_one(name: str, stats: TlsBackendStats, stream: trio.SSLStream[trio.SocketStream]) -> None:
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError:
        stats.failed_handshakes += 1
        return
    stats.handshakes += 1
    stats.resumed += bool(stream.session_reused)
    peer = stream.getpeercert()
    subject = None
    if peer:
        subject = next((v for rdn in peer["subject"] for k, v in rdn if k == "commonName"), None)
    stats.client_subjects.append(subject)
    buf = b""
    try:
        while True:
            while b"\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            if buf.startswith(b"ECHO\n"):
                rest = buf[5:]
                if rest:
                    await stream.send_all(rest)
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                return
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            if b"\r\nupgrade: websocket" in head.lower():
                # A tunnel after 101: echo every byte until the client ends it.
                await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                      b"Connection: Upgrade\r\n\r\n" + buf)
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            while len(buf) < length:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            buf = buf[length:]
            stats.requests += 1
            body = name.encode()
            close = b"connection: close" in head.lower()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nX-Backend: %s\r\n%s\r\n%s"
                % (len(body), body, b"Connection: close\r\n" if close else b"", body)
            )
            if close:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await trio.aclose_forcefully(stream)
        return
    finally:
        # close_notify, so strict clients (OpenSSL 3) see a clean end; a dead peer does not stall us.
        with trio.move_on_after(2) as scope:
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(stream)


async def start_tls_backend(nursery: trio.Nursery, name: str, files: CertFiles, *, client_ca: Path | None = None) -> TlsBackend:
    """A TLS server on 127.0.0.1 that answers HTTP/1.1 with ``name`` (or echoes after ``ECHO\\n``)."""
    stats = TlsBackendStats()
    ctx = server_context(files, client_ca=client_ca, stats=stats)
    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, partial(_serve_one, name, stats), 0, ctx, host="127.0.0.1",
                https_compatible=False)
    )
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    return TlsBackend(name, port, stats)


async def get_refused_by_backend_tls(url: str, caplog: pytest.LogCaptureFixture, pool: str, backend: str,
                                     reason: str) -> None:
    """GET ``url`` through a pool whose backend's TLS the node refuses: what the client and the
    operator see is the same whatever the pool's protocol (HTTP/1.1 or h2): a 502 naming the
    backend and ``reason``, and a warning naming the pool, the backend and ``reason``."""
    with caplog.at_level(logging.WARNING):
        response = await http_get(url)
    assert response.status_code == 502
    assert f"backend {backend}: TLS: {reason}" in response.text, response.text
    assert any(f"pool {pool}: backend {backend}: TLS: {reason}" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records]
