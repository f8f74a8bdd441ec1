"""Who may call what on the control API: the RPC -> role table and the rule that gives a client its role.

Pure: reads a client certificate (PEM) and the names of ``[control]``; never
touches gRPC or the network (the server's interceptor applies the answer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

READ = "read"  # status, lists, shows, watch, health, reflection
ADMIN = "admin"  # every write, drain (and, later, certificates); includes READ
ROLES = (READ, ADMIN)

# The role each RPC needs. The server refuses a method that is not here (fail closed), and
# tests/unit/test_control_roles.py checks every method the server registers is listed.
RPC_ROLES: dict[str, str] = {
    "/fulcrum.v1.Pools/CreatePool": ADMIN,
    "/fulcrum.v1.Pools/GetPool": READ,
    "/fulcrum.v1.Pools/ListPools": READ,
    "/fulcrum.v1.Pools/UpdatePool": ADMIN,
    "/fulcrum.v1.Pools/DeletePool": ADMIN,
    "/fulcrum.v1.Backends/AddBackend": ADMIN,
    "/fulcrum.v1.Backends/RemoveBackend": ADMIN,
    "/fulcrum.v1.Backends/SetWeight": ADMIN,
    "/fulcrum.v1.Backends/Drain": ADMIN,
    "/fulcrum.v1.Backends/Enable": ADMIN,
    "/fulcrum.v1.Backends/Disable": ADMIN,
    "/fulcrum.v1.Cluster/ListNodes": READ,
    "/fulcrum.v1.Cluster/Status": READ,
    "/fulcrum.v1.Cluster/WatchEvents": READ,
    "/fulcrum.v1.Cluster/ListVips": READ,
    "/fulcrum.v1.Cluster/DrainNode": ADMIN,
    "/fulcrum.v1.Certificates/PutCertificate": ADMIN,
    "/fulcrum.v1.Certificates/DeleteCertificate": ADMIN,
    # metadata only: the API never returns a private key
    "/fulcrum.v1.Certificates/GetCertificate": READ,
    "/fulcrum.v1.Certificates/ListCertificates": READ,
    "/fulcrum.v1.Routes/ListRoutes": READ,
    "/fulcrum.v1.Routes/GetRoute": READ,
    "/fulcrum.v1.Routes/PutRoute": ADMIN,
    "/fulcrum.v1.Routes/DeleteRoute": ADMIN,
    "/grpc.health.v1.Health/Check": READ,
    "/grpc.health.v1.Health/Watch": READ,
    "/grpc.health.v1.Health/List": READ,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": READ,
}

# `lbctl certs init` before roles existed issued lbctl's client certificate with CN "lbctl"
# and no OU; it keeps the admin role so that upgrading the nodes locks nobody out.
LEGACY_ADMIN_CN = "lbctl"


@dataclass(frozen=True, slots=True)
class Caller:
    """A client as the control API sees it: its name (certificate CN), its role and why."""

    name: str
    role: str | None  # None: no recognised role, every call is refused
    why: str  # "OU=admin", "control.readers", ... (for refusals and the log)

    def may(self, needed: str) -> bool:
        return self.role == ADMIN or (self.role == READ and needed == READ)

    def describe(self) -> str:
        if self.role is None:
            return f'"{self.name}" has no role ({self.why})'
        return f'"{self.name}" has the {self.role} role ({self.why})'


def role_of(pem: bytes, admins: frozenset[str], readers: frozenset[str]) -> Caller:
    """The role of a verified client certificate: ``[control]`` name lists first, then its subject OU."""
    common_name, units = _subject(pem)
    if common_name in admins:
        return Caller(common_name, ADMIN, "listed in control.admins")
    if common_name in readers:
        return Caller(common_name, READ, "listed in control.readers")
    recognised = [ou for ou in units if ou in ROLES]
    if recognised:
        # Two OUs (admin and read) in one certificate: the lesser one, never a guess upwards.
        role = READ if READ in recognised else ADMIN
        return Caller(common_name, role, f"certificate OU={role}")
    if not units and common_name == LEGACY_ADMIN_CN:
        return Caller(common_name, ADMIN, f"certificate CN={LEGACY_ADMIN_CN} without an OU, as issued before roles")
    shown = ", ".join(f"OU={u}" for u in units) or "no OU"
    return Caller(
        common_name, None,
        f"certificate {shown}: expected OU=admin or OU=read, or its CN in control.admins / control.readers",
    )


@functools.lru_cache(maxsize=256)  # one parse per certificate, not per call
def _subject(pem: bytes) -> tuple[str, tuple[str, ...]]:
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    common_name = str(names[0].value) if names else ""
    return common_name, tuple(str(u.value) for u in units)
