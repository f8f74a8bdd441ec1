"""Real TLS clients for the tests: Python's ssl (http.client over a chosen SNI), curl, openssl."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

from cryptography import x509


def client_context(ca: Path | None = None, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


class SniConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port with ``host`` as the SNI and Host (no DNS)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float = 20.0) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._ctx = context
        self.session: ssl.SSLSession | None = None

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host, session=self.session)

    def peer_names(self) -> list[str]:
        der = self.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        cert = x509.load_der_x509_certificate(der)
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def get(host: str, port: int, ctx: ssl.SSLContext, path: str = "/", method: str = "GET", body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, list[str]]:
    """One request on a new connection: (status, headers, body, names of the server certificate)."""
    conn = SniConnection(host, port, ctx)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, conn.peer_names()
    finally:
        conn.close()
