"""Certificate messages: what the API shows of a ``Certificate``.

Owns the mapping only, and the one rule that matters here: the private key is
never copied into a message. Validation lives in ``lbnode.tls.certs``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.tls.certs import Certificate

CHAIN_BEGIN = b"-----BEGIN CERTIFICATE-----"


def certificate_message(
    cert: Certificate,
    *,
    expiry: str,
    revision: int = 0,
    source: str = "store",
    listeners: Sequence[str] = (),
    with_chain: bool = False,
) -> pb.Certificate:
    """``with_chain``: the public chain too (Get and Put); List leaves it out to stay small."""
    msg = pb.Certificate(
        name=cert.name,
        names=list(cert.names),
        issuer=cert.issuer,
        subject=cert.subject,
        key_type=cert.key_type,
        fingerprint=cert.fingerprint,
        expiry=expiry,
        listeners=list(listeners),
        revision=revision,
        source=source,
        chain_length=cert.chain_pem.count(CHAIN_BEGIN),
    )
    msg.not_before.FromDatetime(cert.not_before)
    msg.not_after.FromDatetime(cert.not_after)
    if with_chain:
        msg.chain_pem = cert.chain_pem.decode("ascii", errors="replace")
    return msg
