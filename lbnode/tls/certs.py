"""Certificates as validated values, and which one answers which server name.

Owns parsing a PEM chain and key into a ``Certificate`` (checked: chain order, key matches
the leaf, at least one name) and the SNI choice. Pure: no sockets, no files, no clock
(``now`` is passed in); never logs or returns the private key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

# A certificate this close to its end is reported "expiring": two weeks leaves an operator
# a week of warnings after a failed automatic renewal (ACME clients renew at 30 days).
EXPIRING_WITHIN = timedelta(days=14)

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


class CertificateError(ValueError):
    """A chain or key that cannot be served; ``str()`` is one line naming the part at fault."""


@dataclass(frozen=True, slots=True)
class Certificate:
    name: str
    chain_pem: bytes  # leaf first, then intermediates
    key_pem: bytes = field(repr=False)  # a secret: never logged, never in repr, never returned by the API
    names: tuple[str, ...]  # DNS SANs, lower-case ("*.example.com" kept as is); CN when no SAN
    not_after: datetime  # UTC
    not_before: datetime
    issuer: str  # RFC 4514
    subject: str
    key_type: str  # "ECDSA P-256", "RSA 2048", "Ed25519"...
    fingerprint: str  # sha256 hex of the leaf DER: identity of the content (cache key)


def load_certificate(name: str, chain_pem: bytes, key_pem: bytes) -> Certificate:
    """Validates: the chain parses (at least one certificate; each issued by the next when
    given), the key parses and matches the leaf's public key, the leaf has at least one name.
    Raises ``CertificateError`` (one line)."""
    chain = _parse_chain(chain_pem)
    leaf = chain[0]
    for i in range(len(chain) - 1):
        _check_issued_by(chain[i], chain[i + 1], i)
    key = _parse_key(key_pem)
    leaf_public = leaf.public_key()
    if _public_der(key.public_key()) != _public_der(leaf_public):
        raise CertificateError(
            f"key: does not match the certificate's public key ({_key_type(key.public_key())} key, "
            f"{_key_type(leaf_public)} certificate {leaf.subject.rfc4514_string()!r})"
        )
    names = _names(leaf)
    if not names:
        raise CertificateError(
            f"cert: the certificate {leaf.subject.rfc4514_string()!r} has no DNS name "
            "(no subjectAltName DNS entry and no common name)"
        )
    return Certificate(
        name=name,
        chain_pem=chain_pem,
        key_pem=key_pem,
        names=names,
        not_after=leaf.not_valid_after_utc,
        not_before=leaf.not_valid_before_utc,
        issuer=leaf.issuer.rfc4514_string(),
        subject=leaf.subject.rfc4514_string(),
        key_type=_key_type(leaf_public),
        fingerprint=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


def expiry(cert: Certificate, now: datetime) -> str:
    """``"ok"`` | ``"expiring"`` (within ``EXPIRING_WITHIN``) | ``"expired"`` at ``now`` (aware, UTC)."""
    if now >= cert.not_after:
        return "expired"
    if cert.not_after - now <= EXPIRING_WITHIN:
        return "expiring"
    return "ok"


def server_name_matches(pattern: str, server_name: str) -> bool:
    """RFC 6125 matching as browsers do it: exact, or ``*.example.com`` covering one label."""
    if pattern.startswith("*."):
        head, _, rest = server_name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == server_name


class SniTable:
    """Which certificate answers which server name: exact name, then wildcard
    (``*.example.com`` matches one label), then the default (the first certificate given).

    Built once per snapshot; for an equal name in two certificates, the earlier one wins.
    ``key_pairs`` gives the certificates to serve together: an RSA and an ECDSA certificate
    for the same names go in one OpenSSL context, which picks by what the client supports."""

    __slots__ = ("default", "_exact", "_wildcard", "_pairs")

    def __init__(self, certificates: Iterable[Certificate]) -> None:
        certs = list(certificates)
        if not certs:
            raise ValueError("SniTable needs at least one certificate (the first is the default)")
        self.default = certs[0]
        self._exact: dict[str, Certificate] = {}
        self._wildcard: dict[str, Certificate] = {}  # "example.com" for "*.example.com"
        by_names: dict[frozenset[str], dict[str, Certificate]] = {}  # names -> key family -> first
        for cert in certs:
            by_names.setdefault(frozenset(cert.names), {}).setdefault(_key_family(cert), cert)
        self._pairs: dict[str, tuple[Certificate, ...]] = {}
        for cert in certs:
            family = _key_family(cert)
            others = tuple(c for f, c in by_names[frozenset(cert.names)].items() if f != family)
            self._pairs[cert.fingerprint] = (cert, *others)
        for cert in certs:
            for n in cert.names:
                if n.startswith("*."):
                    self._wildcard.setdefault(n[2:], cert)
                else:
                    self._exact.setdefault(n, cert)

    def choose(self, server_name: str | None) -> Certificate:
        if not server_name:
            return self.default
        host = server_name.lower().rstrip(".")
        found = self._exact.get(host)
        if found is not None:
            return found
        _, dot, parent = host.partition(".")
        if dot:
            found = self._wildcard.get(parent)
            if found is not None:
                return found
        return self.default

    def key_pairs(self, cert: Certificate) -> tuple[Certificate, ...]:
        """``cert`` first, then the table's certificates for exactly the same names with
        another key type (the first of each type)."""
        return self._pairs.get(cert.fingerprint, (cert,))


def _key_family(cert: Certificate) -> str:
    return cert.key_type.split()[0]  # "ECDSA", "RSA", "Ed25519"


# --------------------------------------------------------------------------- parsing


def _parse_chain(chain_pem: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in chain_pem:
        raise CertificateError("cert: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise CertificateError(f"cert: not a valid PEM certificate chain ({_one_line(exc)})") from None
    if not chain:
        raise CertificateError("cert: no PEM certificate found")
    return chain


def _check_issued_by(cert: x509.Certificate, issuer: x509.Certificate, i: int) -> None:
    where = f"cert: certificate {i + 1} of the chain ({cert.subject.rfc4514_string()!r})"
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise CertificateError(
            f"{where} is not issued by certificate {i + 2} ({issuer.subject.rfc4514_string()!r}): "
            f"{_one_line(exc) or 'bad signature'}; the chain must be leaf first, then its issuers in order"
        ) from None


def _parse_key(key_pem: bytes) -> PrivateKeyTypes:
    if b"-----BEGIN" not in key_pem or b"PRIVATE KEY-----" not in key_pem:
        raise CertificateError("key: no PEM private key found (expected -----BEGIN ... PRIVATE KEY-----)")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateError("key: the private key is encrypted; give it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"key: not a valid PEM private key ({_one_line(exc)})") from None
    if isinstance(key, dsa.DSAPrivateKey):
        raise CertificateError("key: DSA keys are not supported by TLS 1.3; use ECDSA, RSA or Ed25519")
    return key


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_type(public_key: PublicKeyTypes) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ECDSA {_CURVE_NAMES.get(public_key.curve.name, public_key.curve.name)}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(public_key).__name__


def _names(leaf: x509.Certificate) -> tuple[str, ...]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dns = []
    if not dns:
        # RFC 6125 allows the CN only when there is no DNS SAN; clients mostly refuse it, but a
        # name is still what picks the certificate by SNI.
        dns = [str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(dns))  # unique, order kept


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
