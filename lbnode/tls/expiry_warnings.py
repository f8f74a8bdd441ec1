"""Which served certificates deserve a WARNING in the node log: expiring (14 days) or expired.

Owns the "say it once" rule: a certificate is reported when it enters the
expiring or expired state, and again only if it changes (a new fingerprint, or
expiring -> expired). Pure: the caller passes the certificates and ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from lbnode.tls.certs import Certificate, expiry


class ExpiryWarnings:
    def __init__(self) -> None:
        self._told: dict[str, tuple[str, str]] = {}  # name -> (fingerprint, state) last reported

    def check(self, certificates: Iterable[Certificate], now: datetime) -> list[str]:
        """The lines to log now (empty when nothing new is expiring or expired)."""
        lines: list[str] = []
        seen: set[str] = set()
        for cert in certificates:
            seen.add(cert.name)
            state = expiry(cert, now)
            if state == "ok":
                self._told.pop(cert.name, None)
                continue
            if self._told.get(cert.name) == (cert.fingerprint, state):
                continue
            self._told[cert.name] = (cert.fingerprint, state)
            lines.append(_line(cert, state, now))
        for name in set(self._told) - seen:
            del self._told[name]
        return lines


def _line(cert: Certificate, state: str, now: datetime) -> str:
    when = cert.not_after.strftime("%Y-%m-%d %H:%M UTC")
    renew = f"renew it: lbctl certs put {cert.name} --cert CHAIN.pem --key KEY.pem"
    if state == "expired":
        return (f"certificate {cert.name} ({', '.join(cert.names)}) EXPIRED on {when}; it is still served "
                f"but clients refuse it: {renew}")
    days = (cert.not_after - now).total_seconds() / 86400
    return f"certificate {cert.name} ({', '.join(cert.names)}) expires in {days:.1f} days ({when}): {renew}"
