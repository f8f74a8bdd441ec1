"""lbnode.tls.certs: real certificates made by cryptography (ECDSA P-256, RSA), no network."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lbnode.tls.certs import (
    CertificateError,
    SniTable,
    expiry,
    load_certificate,
    server_name_matches,
)
from tests.tlsgen import make_ca, make_leaf

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca():
    return make_ca()


def test_ecdsa_leaf_with_intermediate(ca) -> None:
    inter = make_ca("Test Intermediate", issuer=ca)
    leaf = make_leaf(inter, ["www.Example.com", "example.com"])
    cert = load_certificate("web", leaf.cert_pem + inter.cert_pem, leaf.key_pem)
    assert cert.names == ("www.example.com", "example.com")
    assert cert.key_type == "ECDSA P-256"
    assert cert.subject == "CN=www.Example.com"
    assert cert.issuer == "CN=Test Intermediate"
    assert len(cert.fingerprint) == 64
    assert cert.not_after.tzinfo is not None
    assert "PRIVATE" not in repr(cert) and "key_pem" not in repr(cert)


def test_rsa_leaf(ca) -> None:
    leaf = make_leaf(ca, ["rsa.example.com"], kind="rsa")
    cert = load_certificate("rsa", leaf.cert_pem, leaf.key_pem)
    assert cert.key_type == "RSA 2048"


def test_fingerprint_is_the_content(ca) -> None:
    leaf = make_leaf(ca, ["a.example.com"])
    one = load_certificate("a", leaf.cert_pem, leaf.key_pem)
    two = load_certificate("b", leaf.cert_pem, leaf.key_pem)
    other = make_leaf(ca, ["a.example.com"])
    assert one.fingerprint == two.fingerprint
    assert load_certificate("a", other.cert_pem, other.key_pem).fingerprint != one.fingerprint


def test_common_name_when_no_san(ca) -> None:
    leaf = make_leaf(ca, [], cn="Legacy.Example.com")
    assert load_certificate("l", leaf.cert_pem, leaf.key_pem).names == ("legacy.example.com",)


def test_mismatched_key_is_refused(ca) -> None:
    leaf = make_leaf(ca, ["a.example.com"])
    other = make_leaf(ca, ["a.example.com"], kind="rsa")
    with pytest.raises(CertificateError, match=r"^key: does not match the certificate's public key \(RSA 2048 key, ECDSA P-256 certificate"):
        load_certificate("a", leaf.cert_pem, other.key_pem)


def test_chain_out_of_order_is_refused(ca) -> None:
    inter = make_ca("Test Intermediate", issuer=ca)
    leaf = make_leaf(inter, ["a.example.com"])
    with pytest.raises(CertificateError, match=r"^cert: certificate 1 of the chain \('CN=a.example.com'\) is not issued by certificate 2 \('CN=Test CA'\)"):
        load_certificate("a", leaf.cert_pem + ca.cert_pem, leaf.key_pem)


@pytest.mark.parametrize(
    ("chain", "key", "message"),
    [
        (b"", None, r"^cert: no PEM certificate found"),
        (b"hello world", None, r"^cert: no PEM certificate found"),
        (b"-----BEGIN CERTIFICATE-----\nnot base64!!\n-----END CERTIFICATE-----\n", None, r"^cert: not a valid PEM certificate chain"),
        (None, b"garbage", r"^key: no PEM private key found"),
        (None, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", r"^key: not a valid PEM private key"),
    ],
)
def test_garbage_pem(ca, chain, key, message) -> None:
    leaf = make_leaf(ca, ["a.example.com"])
    with pytest.raises(CertificateError, match=message) as info:
        load_certificate("a", leaf.cert_pem if chain is None else chain, leaf.key_pem if key is None else key)
    assert "\n" not in str(info.value)


def test_encrypted_key_is_refused(ca) -> None:
    from cryptography.hazmat.primitives import serialization

    leaf = make_leaf(ca, ["a.example.com"])
    encrypted = leaf.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(CertificateError, match=r"^key: the private key is encrypted"):
        load_certificate("a", leaf.cert_pem, encrypted)


def test_expiry(ca) -> None:
    expired = make_leaf(ca, ["old.example.com"], not_before=NOW - timedelta(days=100), not_after=NOW - timedelta(days=1))
    cert = load_certificate("old", expired.cert_pem, expired.key_pem)  # loads: expiry is reported, not refused
    assert expiry(cert, NOW) == "expired"
    soon = make_leaf(ca, ["soon.example.com"], not_after=NOW + timedelta(days=14))
    soon_cert = load_certificate("soon", soon.cert_pem, soon.key_pem)
    assert expiry(soon_cert, NOW) == "expiring"
    assert expiry(soon_cert, NOW - timedelta(days=1)) == "ok"
    assert expiry(soon_cert, soon_cert.not_after) == "expired"


def test_sni_table(ca) -> None:
    default = load_certificate("default", *_pems(make_leaf(ca, ["default.example.org"])))
    wildcard = load_certificate("wild", *_pems(make_leaf(ca, ["*.example.com"], kind="rsa")))
    exact = load_certificate("www", *_pems(make_leaf(ca, ["www.example.com"])))
    table = SniTable([default, wildcard, exact])
    assert table.choose("www.example.com") is exact  # exact beats the wildcard
    assert table.choose("WWW.Example.COM.") is exact
    assert table.choose("api.example.com") is wildcard
    assert table.choose("a.b.example.com") is default  # a wildcard covers one label
    assert table.choose("example.com") is default
    assert table.choose("unknown.test") is default
    assert table.choose(None) is default
    assert table.choose("") is default
    with pytest.raises(ValueError):
        SniTable([])


def test_sni_table_first_certificate_wins_a_shared_name(ca) -> None:
    one = load_certificate("one", *_pems(make_leaf(ca, ["a.example.com"])))
    two = load_certificate("two", *_pems(make_leaf(ca, ["a.example.com"])))
    assert SniTable([two, one]).choose("a.example.com") is two


def test_server_name_matches() -> None:
    assert server_name_matches("*.example.com", "a.example.com")
    assert not server_name_matches("*.example.com", "example.com")
    assert not server_name_matches("*.example.com", "a.b.example.com")
    assert server_name_matches("a.example.com", "a.example.com")


def _pems(issued):
    return issued.cert_pem, issued.key_pem


def test_key_pairs_for_the_same_names(ca) -> None:
    ec1 = load_certificate("ec", *_pems(make_leaf(ca, ["a.example.com", "b.example.com"])))
    rsa1 = load_certificate("rsa", *_pems(make_leaf(ca, ["b.example.com", "a.example.com"], kind="rsa")))
    ec2 = load_certificate("ec2", *_pems(make_leaf(ca, ["a.example.com", "b.example.com"])))
    other = load_certificate("other", *_pems(make_leaf(ca, ["a.example.com"], kind="rsa")))
    table = SniTable([ec1, rsa1, ec2, other])
    assert table.choose("a.example.com") is ec1
    assert table.key_pairs(ec1) == (ec1, rsa1)
    assert table.key_pairs(rsa1) == (rsa1, ec1)
    assert table.key_pairs(other) == (other,)  # different names: served alone
