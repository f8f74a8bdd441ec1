"""lbnode.tls.context.make_sni_callback remembers the context chosen for a server name while
the snapshot's SNI table is the same object, and chooses again from a new table (a rotation):
real handshakes over socket pairs, the certificate the client receives is what is asserted."""

from __future__ import annotations

import socket
import ssl
import threading
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from lbnode.model import ListenerTls
from lbnode.tls import context as tlsctx
from lbnode.tls.certs import Certificate, SniTable, load_certificate
from tests.tlsgen import make_ca, make_leaf

SETTINGS = ListenerTls(certificates=("www",))
ALPN = ("http/1.1",)


def _cert(name: str, names: list[str]) -> Certificate:
    leaf = make_leaf(make_ca(), names)
    return load_certificate(name, leaf.cert_pem, leaf.key_pem)


def _served(server_ctx: ssl.SSLContext, server_name: str) -> bytes:
    """The certificate (DER) a client asking for ``server_name`` receives."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    a, b = socket.socketpair()
    server = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    client = client_ctx.wrap_socket(b, server_hostname=server_name, do_handshake_on_connect=False)
    t = threading.Thread(target=client.do_handshake)
    t.start()
    server.do_handshake()
    t.join()
    der = client.getpeercert(binary_form=True)
    server.close()
    client.close()
    assert der is not None
    return der


def test_the_choice_is_remembered_per_table_and_made_again_for_a_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    www, other = _cert("www", ["www.test"]), _cert("other", ["other.test"])
    node = SimpleNamespace(snapshot=SimpleNamespace(sni={"web": SniTable([www, other])}))
    chosen: list[tuple[str, ...]] = []
    real = tlsctx.certificate_context

    def counted(certs: tuple[Certificate, ...], settings: ListenerTls, alpn: tuple[str, ...]) -> ssl.SSLContext:
        chosen.append(tuple(c.name for c in certs))
        return real(certs, settings, alpn)

    monkeypatch.setattr(tlsctx, "certificate_context", counted)
    failures: list[str] = []
    server_ctx = tlsctx.listener_context(SETTINGS, ALPN)
    server_ctx.sni_callback = tlsctx.make_sni_callback(  # type: ignore[assignment]
        "web", SETTINGS, ALPN, lambda: node.snapshot, lambda _s, kind: failures.append(kind))
    www_der, other_der = (_served(server_ctx, n) for n in ("www.test", "other.test"))
    assert www_der != other_der
    assert x509.load_der_x509_certificate(www_der).fingerprint(hashes.SHA256()).hex() == www.fingerprint
    assert _served(server_ctx, "www.test") == www_der
    assert _served(server_ctx, "unknown.test") == www_der  # the default
    assert chosen == [("www",), ("other",), ("www",)]  # www.test's second time: remembered
    # A new snapshot (a rotation: www.test now served by a new certificate): chosen again.
    rotated = _cert("www", ["www.test"])
    node.snapshot = SimpleNamespace(sni={"web": SniTable([rotated, other])})
    new_der = _served(server_ctx, "www.test")
    assert new_der not in (www_der, other_der)
    assert _served(server_ctx, "other.test") == other_der
    assert len(chosen) == 5 and failures == []


def test_past_the_memo_size_names_are_chosen_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    www = _cert("www", ["www.test", "*.wild.test"])
    node = SimpleNamespace(snapshot=SimpleNamespace(sni={"web": SniTable([www])}))
    calls: list[str] = []
    real = tlsctx.certificate_context
    monkeypatch.setattr(tlsctx, "SNI_MEMO_SIZE", 2)
    monkeypatch.setattr(tlsctx, "certificate_context",
                        lambda certs, settings, alpn: calls.append("x") or real(certs, settings, alpn))
    server_ctx = tlsctx.listener_context(SETTINGS, ALPN)
    server_ctx.sni_callback = tlsctx.make_sni_callback(  # type: ignore[assignment]
        "web", SETTINGS, ALPN, lambda: node.snapshot, lambda _s, _k: None)
    for name in ("a.wild.test", "b.wild.test", "c.wild.test", "c.wild.test", "a.wild.test"):
        _served(server_ctx, name)
    assert len(calls) == 4  # a and b remembered; c (the third name) chosen both times
