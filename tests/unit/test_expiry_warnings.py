"""The expiry warning rule: once per certificate and state, again on a new certificate or when it expires."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from lbnode.tls.certs import load_certificate
from lbnode.tls.expiry_warnings import ExpiryWarnings
from tests.tlsgen import make_ca, make_leaf

CA = make_ca()
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def cert(name: str, not_after: datetime):  # type: ignore[no-untyped-def]
    leaf = make_leaf(CA, [f"{name}.example.com"], not_before=not_after - timedelta(days=90), not_after=not_after)
    return load_certificate(name, leaf.cert_pem, leaf.key_pem)


def test_ok_certificates_are_not_mentioned() -> None:
    assert ExpiryWarnings().check([cert("www", NOW + timedelta(days=15))], NOW) == []


def test_an_expiring_certificate_is_warned_once_then_again_when_it_expires() -> None:
    warnings = ExpiryWarnings()
    www = cert("www", NOW + timedelta(days=5))
    (line,) = warnings.check([www], NOW)
    assert line.startswith("certificate www (www.example.com) expires in 5.0 days (2026-12-09 12:00 UTC)")
    assert "lbctl certs put www" in line
    assert warnings.check([www], NOW + timedelta(hours=1)) == []  # said already
    (expired,) = warnings.check([www], NOW + timedelta(days=6))
    assert "EXPIRED on 2026-12-09 12:00 UTC; it is still served" in expired
    assert warnings.check([www], NOW + timedelta(days=7)) == []


def test_a_rotation_to_another_expiring_certificate_is_warned_again_and_a_renewal_resets() -> None:
    warnings = ExpiryWarnings()
    assert len(warnings.check([cert("www", NOW + timedelta(days=5))], NOW)) == 1
    assert len(warnings.check([cert("www", NOW + timedelta(days=6))], NOW)) == 1  # a new fingerprint
    assert warnings.check([cert("www", NOW + timedelta(days=90))], NOW) == []  # renewed: quiet
    assert len(warnings.check([cert("www", NOW + timedelta(days=3))], NOW)) == 1
    assert warnings.check([], NOW) == []  # gone: forgotten
