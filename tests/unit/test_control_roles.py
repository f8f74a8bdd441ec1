"""The control API's role table and the rule giving a client certificate its role (pure: no server here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from lbctl import certs
from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.config import ConfigFileError, load_config_text
from lbnode.control.roles import ADMIN, READ, RPC_ROLES, role_of

NONE: frozenset[str] = frozenset()


def every_served_method() -> set[str]:
    """Every method of every service serve_control registers (ours, health, reflection)."""
    services = [
        *pb.DESCRIPTOR.services_by_name.values(),
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}


def test_every_rpc_of_the_services_has_a_role_and_the_table_has_no_stale_entry() -> None:
    served = every_served_method()
    assert served - set(RPC_ROLES) == set(), "an RPC without a role would be refused to everyone"
    assert set(RPC_ROLES) - served == set()
    assert set(RPC_ROLES.values()) == {READ, ADMIN}


def test_writes_and_drain_need_admin_and_reads_need_read() -> None:
    admin = {m.rsplit("/", 1)[1] for m, r in RPC_ROLES.items() if r == ADMIN}
    assert admin == {"CreatePool", "UpdatePool", "DeletePool", "AddBackend", "RemoveBackend", "SetWeight",
                     "Drain", "Enable", "Disable", "DrainNode", "PutCertificate", "DeleteCertificate",
                     "PutRoute", "DeleteRoute"}


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    certs.init_certs(directory, ["n1"], {})
    return directory


def test_certs_init_issues_an_admin_and_a_reader_certificate(issued: Path) -> None:
    admin = role_of((issued / "client.pem").read_bytes(), NONE, NONE)
    assert (admin.name, admin.role, admin.why) == ("lbctl", ADMIN, "certificate OU=admin")
    reader = role_of((issued / "reader.pem").read_bytes(), NONE, NONE)
    assert (reader.name, reader.role) == ("lbctl-reader", READ)
    assert reader.may(READ) and not reader.may(ADMIN) and admin.may(READ) and admin.may(ADMIN)
    assert oct((issued / "reader.key").stat().st_mode & 0o777) == "0o600"


def test_a_certificate_without_a_recognised_role_gets_nothing(issued: Path) -> None:
    node = role_of((issued / "n1.pem").read_bytes(), NONE, NONE)
    assert node.role is None and not node.may(READ)
    assert node.describe() == ('"n1" has no role (certificate no OU: expected OU=admin or OU=read, '
                               'or its CN in control.admins / control.readers)')


def legacy_client(directory: Path, common_name: str = "lbctl", unit: str | None = None) -> tuple[bytes, bytes]:
    """A client certificate and its key as `lbctl certs init` issued them before roles (CN lbctl, no OU)."""
    ca_cert = certs.x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs._leaf(common_name, key, ca_cert, ca_key, [], server=False, unit=unit)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_the_client_certificate_of_an_older_certs_init_keeps_admin_by_its_cn(issued: Path) -> None:
    old = role_of(legacy_client(issued)[0], NONE, NONE)
    assert old.role == ADMIN and "without an OU" in old.why
    # Only that exact name, and only without an OU.
    assert role_of(legacy_client(issued, "someone")[0], NONE, NONE).role is None
    assert role_of(legacy_client(issued, "lbctl", "ops")[0], NONE, NONE).role is None


def test_name_lists_override_the_ou(issued: Path) -> None:
    demoted = role_of((issued / "client.pem").read_bytes(), NONE, frozenset({"lbctl"}))
    assert (demoted.role, demoted.why) == (READ, "listed in control.readers")
    promoted = role_of((issued / "reader.pem").read_bytes(), frozenset({"lbctl-reader"}), NONE)
    assert promoted.role == ADMIN
    node = role_of((issued / "n1.pem").read_bytes(), NONE, frozenset({"n1"}))
    assert node.role == READ


CONTROL = '[node]\nid = "n1"\n[control]\nbind = "127.0.0.1:0"\nca = "c"\ncert = "c"\nkey = "k"\n'


def test_control_name_lists_are_validated_naming_the_key() -> None:
    config = load_config_text(CONTROL + 'admins = ["alice"]\nreaders = ["grafana", "ci"]\n', "n.toml")
    assert config.control is not None
    assert config.control.admins == {"alice"} and config.control.readers == {"grafana", "ci"}
    cases = {
        'admins = "alice"': 'control.admins: expected a list of certificate common names like ["alice"], got a string',
        'readers = ["ok", ""]': "control.readers[1]: expected a certificate common name (a non-empty string)",
        'admins = ["a"]\nreaders = ["a"]': 'control.readers: "a" is also in control.admins: give each name one role',
    }
    for extra, message in cases.items():
        with pytest.raises(ConfigFileError) as caught:
            load_config_text(CONTROL + extra + "\n", "n.toml")
        assert str(caught.value) == f"n.toml: {message}"
    with pytest.raises(ConfigFileError, match=r"^n: control\.admins: roles come from client certificates"):
        load_config_text('[node]\nid = "n1"\n[control]\nbind = "127.0.0.1:0"\ninsecure = true\nadmins = ["a"]\n', "n")
