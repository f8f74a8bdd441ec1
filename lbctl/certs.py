"""``lbctl certs init``: a cluster CA, one certificate per node and lbctl's admin and read-only client certificates.

Owns what the control API's mutual TLS needs: every node certificate names
the node, localhost/127.0.0.1 and the node's given addresses; a client
certificate's OU is its role (lbnode/control/roles.py); private keys are
written mode 0600. Never sends anything anywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Node and client certificates: about two years, the longest browsers-era CAs accept;
# the CA outlives them so that re-issuing a node does not mean re-issuing everything.
LEAF_DAYS = 825
CA_DAYS = 3650
ORGANIZATION = "Fulcrum"
# The two client certificates: file stem, common name, role (the subject OU the node reads).
CLIENTS = (("client", "lbctl", "admin"), ("reader", "lbctl-reader", "read"))


class CertsError(Exception):
    """One line for the operator."""


@dataclass(frozen=True, slots=True)
class Written:
    path: Path
    what: str


def parse_hosts(values: list[str], nodes: list[str]) -> dict[str, list[str]]:
    """``n1=192.0.2.1,n2=lb2.example.com`` (repeatable) -> extra names per node."""
    hosts: dict[str, list[str]] = {n: [] for n in nodes}
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            node, sep, host = item.partition("=")
            if not sep or not host:
                raise CertsError(f'--hosts: "{item}" is not NODE=ADDRESS')
            if node not in hosts:
                raise CertsError(f'--hosts: "{node}" is not one of --nodes ({", ".join(nodes)})')
            hosts[node].append(host)
    return hosts


def init_certs(directory: Path, nodes: list[str], hosts: dict[str, list[str]]) -> list[Written]:
    """Creates (or reuses) ca.pem/ca.key; writes NODE.pem/.key per node, client.pem/.key (admin), reader.pem/.key (read)."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Written] = []
    ca_cert, ca_key = _ca(directory, "Fulcrum cluster CA", written)
    for node in nodes:
        key = ec.generate_private_key(ec.SECP256R1())
        names = [node, "localhost", "127.0.0.1", *hosts.get(node, [])]
        cert = _leaf(node, key, ca_cert, ca_key, names, server=True)
        _write_key(directory / f"{node}.key", key)
        (directory / f"{node}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written += [
            Written(directory / f"{node}.pem", f"node {node}: {', '.join(dict.fromkeys(names))}"),
            Written(directory / f"{node}.key", f"node {node} key"),
        ]
    for stem, common_name, role in CLIENTS:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(common_name, key, ca_cert, ca_key, [], server=False, unit=role)
        _write_key(directory / f"{stem}.key", key)
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written += [
            Written(directory / f"{stem}.pem", f"client {common_name}: role {role} (OU={role})"),
            Written(directory / f"{stem}.key", f"client {common_name} key"),
        ]
    return written


def init_etcd_certs(directory: Path, members: dict[str, list[str]]) -> list[Written]:
    """etcd's own CA in ``directory`` (ca.pem/ca.key, reused when there), MEMBER.pem/.key per member, client.pem/.key.

    A CA apart from the control API's: etcd with --client-cert-auth lets any certificate its CA
    signed do anything, so a control-API client (a read-only one included) must not get in.
    Member certificates serve clients and peers (server and client usage, the member's
    addresses as SANs); client.pem is what every lbnode presents to etcd (issued once, then kept).
    """
    for name in members:
        if name in ("ca", "client"):
            raise CertsError(f'--etcd-members: "{name}" is reserved (its files would overwrite {name}.pem)')
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Written] = []
    ca_cert, ca_key = _ca(directory, "Fulcrum etcd CA", written)
    for member, addresses in members.items():
        key = ec.generate_private_key(ec.SECP256R1())
        names = [member, "localhost", "127.0.0.1", *addresses]
        cert = _leaf(member, key, ca_cert, ca_key, names, server=True, unit="etcd-member")
        _write_key(directory / f"{member}.key", key)
        (directory / f"{member}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written += [
            Written(directory / f"{member}.pem", f"etcd member {member}: {', '.join(dict.fromkeys(names))}"),
            Written(directory / f"{member}.key", f"etcd member {member} key"),
        ]
    if (directory / "client.pem").exists() and (directory / "client.key").exists():
        # Kept: every node holds a copy, and adding a member must not change what they present.
        written.append(Written(directory / "client.pem", "etcd client (kept)"))
        return written
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf("lbnode", key, ca_cert, ca_key, [], server=False, unit="etcd-client")
    _write_key(directory / "client.key", key)
    (directory / "client.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    written += [
        Written(directory / "client.pem", "etcd client (every lbnode)"),
        Written(directory / "client.key", "etcd client key"),
    ]
    return written


def parse_members(values: list[str]) -> dict[str, list[str]]:
    """``m1=192.0.2.1,m2=192.0.2.2`` (repeatable; a member may be named twice) -> addresses per member."""
    members: dict[str, list[str]] = {}
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            member, sep, address = item.partition("=")
            if not sep or not member or not address:
                raise CertsError(f'--etcd-members: "{item}" is not MEMBER=ADDRESS')
            members.setdefault(member, []).append(address)
    return members


def _ca(directory: Path, common_name: str, written: list[Written]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """ca.pem/ca.key of ``directory``: loaded when both exist (adding a node keeps the CA), else created."""
    ca_cert_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists():
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
            loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise CertsError(f"{directory}: existing ca.pem/ca.key cannot be used: {exc}") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CertsError(f"{ca_key_path}: expected an EC private key")
        written.append(Written(ca_cert_path, "CA (kept)"))
        return ca_cert, loaded
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, common_name)
    _write_key(ca_key_path, ca_key)
    ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    written += [Written(ca_cert_path, f"{common_name} certificate"), Written(ca_key_path, f"{common_name} key")]
    return ca_cert, ca_key


def _now() -> datetime.datetime:
    # Backdated a little: a node whose clock is slightly behind must still accept it.
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: list[str],
    *,
    server: bool,
    unit: str | None = None,
) -> x509.Certificate:
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)  # nodes also call each other as clients
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if unit is not None:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(_now() + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _general_names(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
