"""The client certificate headers: what a backend gets, and nothing that could end a header."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization

from lbnode.tls.terminate import client_certificate_headers
from tests.tlsgen import make_ca, make_leaf


def test_subject_and_sans() -> None:
    leaf = make_leaf(make_ca(), ["a.example.com", "b.example.com"], cn="alice", client=True)
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    assert client_certificate_headers(der) == (
        b"X-Client-Cert-Subject: CN=alice\r\nX-Client-Cert-SANs: DNS:a.example.com, DNS:b.example.com\r\n"
    )


def test_control_characters_are_escaped() -> None:
    leaf = make_leaf(make_ca(), [], cn="evil\r\nX-Admin: yes", client=True)
    out = client_certificate_headers(leaf.cert.public_bytes(serialization.Encoding.DER))
    assert out.count(b"\r\n") == 1  # one header line: the subject, escaped
    assert out == b"X-Client-Cert-Subject: CN=evil\\x0d\\x0aX-Admin: yes\r\n"
