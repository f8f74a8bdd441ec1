"""Certificates in the pool store: ``{prefix}/certs/<name>`` in etcd, ``state_dir/certificates.json`` standalone.

Owns how a certificate (chain, key and its metadata) is written to a store, the
compare-revision writes and the watches. Every value read is validated again
with ``load_certificate``: the PEM is the truth, the metadata is for people
reading etcd. Never logs a private key; blocking and thread-safe.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from lbnode.cluster.etcd import EtcdConnection, KeyEvent, watch_with_resync
from lbnode.cluster.store import (
    AlreadyExists,
    CertificateEvent,
    CertificateRecord,
    CertificateResync,
    Conflict,
    NotFound,
    StopFlag,
    StoreError,
    Unavailable,
    follow_history,
)
from lbnode.model import NAME_RE, ConfigFileError
from lbnode.statedir import write_atomic
from lbnode.tls.certs import Certificate, CertificateError, load_certificate

log = logging.getLogger("lbnode.cluster")

FILE_NAME = "certificates.json"
FORMAT = 1  # bumped if the layout of certificates.json ever changes
# Changes kept for file watchers that fall behind; older ones get a resync instead.
HISTORY = 256


# --------------------------------------------------------------------------- encoding


def certificate_document(cert: Certificate) -> dict[str, Any]:
    """The stored form: both PEMs, and the metadata an operator reading etcd wants to see."""
    return {
        "name": cert.name,
        "chain": cert.chain_pem.decode("ascii"),
        "key": cert.key_pem.decode("ascii"),
        "names": list(cert.names),
        "not_before": _time(cert.not_before),
        "not_after": _time(cert.not_after),
        "issuer": cert.issuer,
        "subject": cert.subject,
        "key_type": cert.key_type,
        "fingerprint": cert.fingerprint,
    }


def certificate_from_document(document: object, name: str) -> Certificate:
    """A stored value back into a validated ``Certificate``; ``CertificateError`` (one line) otherwise."""
    if not isinstance(document, dict):
        raise CertificateError("not a JSON object with chain and key")
    chain, key = document.get("chain"), document.get("key")
    if not isinstance(chain, str) or not isinstance(key, str):
        raise CertificateError('"chain" and "key" must be PEM strings')
    if document.get("name", name) != name:
        raise CertificateError(f'name "{document.get("name")}" does not match the key (expected "{name}")')
    return load_certificate(name, chain.encode(), key.encode())


def _encode(cert: Certificate) -> bytes:
    return json.dumps(certificate_document(cert), sort_keys=True, separators=(",", ":")).encode()


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- etcd


class EtcdCertificates:
    """``CertificateStore`` over etcd: ``{prefix}/certs/<name>`` holds ``certificate_document`` as JSON.

    Writes compare revisions exactly as pool writes do (``lbnode.cluster.etcd.EtcdStore``).
    A value that is not a valid certificate (written with etcdctl) is logged once, naming
    the key, and skipped: nodes keep serving the last valid version.
    """

    def __init__(self, conn: EtcdConnection, prefix: str) -> None:
        self.conn = conn
        self.prefix = f"{prefix}/certs/"
        self._logged_bad: set[tuple[str, int]] = set()
        self._bad_lock = threading.Lock()

    def key(self, name: str) -> str:
        return self.prefix + name

    def list_certificates(self) -> tuple[list[CertificateRecord], int]:
        kvs, revision = self.conn.get_prefix(self.prefix)
        records = [r for kv in kvs if (r := self._decode(kv.key, kv.value, kv.mod_revision)) is not None]
        return records, revision

    def get_certificate(self, name: str) -> CertificateRecord:
        kv = self.conn.get(self.key(name))
        if kv is None:
            raise NotFound(f'certificate "{name}" does not exist')
        try:
            return CertificateRecord(certificate_from_document(json.loads(kv.value), name), kv.mod_revision)
        except (ValueError, CertificateError) as exc:
            raise StoreError(
                f"{kv.key}: the stored certificate is not valid ({exc}); replace it with lbctl certs put, "
                f"or delete it with `etcdctl del {kv.key}`"
            ) from None

    def put_certificate(self, certificate: Certificate, expected_revision: int | None = None) -> CertificateRecord:
        name = certificate.name
        done, revision = self.conn.write_if(
            f'write certificate "{name}"', self.key(name), _encode(certificate), expected_revision
        )
        if not done:
            raise _refusal(name, expected_revision, revision)
        return CertificateRecord(certificate, revision)

    def delete_certificate(self, name: str, expected_revision: int | None = None) -> None:
        done, revision = self.conn.write_if(f'delete certificate "{name}"', self.key(name), None, expected_revision)
        if not done:
            raise _refusal(name, expected_revision, revision)

    def watch_certificates(
        self, after_revision: int, stop: StopFlag
    ) -> Iterator[CertificateEvent | CertificateResync]:
        def resync() -> tuple[CertificateResync, int]:
            records, revision = self.list_certificates()
            return CertificateResync(tuple(records), revision), revision

        yield from watch_with_resync(self.conn, self.prefix, after_revision, stop, "certificate", self._event, resync)

    def _event(self, change: KeyEvent) -> CertificateEvent | None:
        name = change.key[len(self.prefix):]
        if change.value is None:
            return CertificateEvent(name, None, change.revision) if NAME_RE.fullmatch(name) else None
        record = self._decode(change.key, change.value, change.revision)
        return None if record is None else CertificateEvent(name, record, change.revision)

    def _decode(self, key: str, value: bytes, revision: int) -> CertificateRecord | None:
        name = key[len(self.prefix):]
        try:
            if not NAME_RE.fullmatch(name):
                raise CertificateError(f'"{name}" is not a certificate name')
            return CertificateRecord(certificate_from_document(json.loads(value), name), revision)
        except (ValueError, CertificateError) as exc:  # foreign data: the data's fault
            with self._bad_lock:
                first = (key, revision) not in self._logged_bad
                self._logged_bad.add((key, revision))
            if first:
                log.warning(
                    "%s (revision %d) is not a valid certificate, skipped: %s; nodes keep its last valid "
                    "version. Fix it with lbctl certs put, or `etcdctl del %s`",
                    key, revision, exc, key,
                )
            return None


def _refusal(name: str, expected_revision: int | None, now: int) -> StoreError:
    if not now:
        return NotFound(f'certificate "{name}" does not exist')
    if expected_revision == 0:
        return AlreadyExists(f'certificate "{name}" already exists (revision {now})')
    return Conflict(
        f'certificate "{name}" changed since revision {expected_revision} (now at {now}): read it again and retry'
    )


# --------------------------------------------------------------------------- state_dir


class FileCertificates:
    """``CertificateStore`` in ``state_dir/certificates.json`` (mode 0600: it holds private keys).

    One revision counter for the file; each certificate's revision is the counter at its
    last write. Writes are atomic (``write_atomic``); memory changes only once the file did.
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._history: deque[CertificateEvent] = deque(maxlen=HISTORY)
        self._certs, self._revision = self._load() if self.path.exists() else ({}, 0)
        self._oldest = self._revision  # watchers asking for anything older get a resync

    def list_certificates(self) -> tuple[list[CertificateRecord], int]:
        with self._lock:
            return [self._certs[n] for n in sorted(self._certs)], self._revision

    def get_certificate(self, name: str) -> CertificateRecord:
        with self._lock:
            return self._get(name)

    def put_certificate(self, certificate: Certificate, expected_revision: int | None = None) -> CertificateRecord:
        name = certificate.name
        with self._lock:
            existing = self._certs.get(name)
            if expected_revision == 0 and existing is not None:
                raise AlreadyExists(f'certificate "{name}" already exists (revision {existing.revision})')
            if expected_revision:
                self._check(self._get(name), expected_revision)
            record = CertificateRecord(certificate, self._revision + 1)
            self._save(name, record)
            return record

    def delete_certificate(self, name: str, expected_revision: int | None = None) -> None:
        with self._lock:
            record = self._get(name)
            if expected_revision is not None:
                self._check(record, expected_revision)
            self._save(name, None)

    def watch_certificates(
        self, after_revision: int, stop: StopFlag
    ) -> Iterator[CertificateEvent | CertificateResync]:
        return follow_history(
            self._changed, stop, after_revision, lambda: (self._oldest, self._revision, self._history),
            lambda: CertificateResync(tuple(self._certs[n] for n in sorted(self._certs)), self._revision))

    # ------------------------------------------------------------------ internals
    def _get(self, name: str) -> CertificateRecord:
        record = self._certs.get(name)
        if record is None:
            raise NotFound(f'certificate "{name}" does not exist')
        return record

    @staticmethod
    def _check(record: CertificateRecord, expected_revision: int) -> None:
        if record.revision != expected_revision:
            raise Conflict(
                f'certificate "{record.certificate.name}" changed since revision {expected_revision} '
                f"(now at {record.revision}): read it again and retry"
            )

    def _save(self, name: str, record: CertificateRecord | None) -> None:
        revision = self._revision + 1
        certs = dict(self._certs)
        if record is None:
            del certs[name]
        else:
            certs[name] = record
        document = {
            "format": FORMAT,
            "revision": revision,
            "certificates": [
                {"revision": certs[n].revision, "certificate": certificate_document(certs[n].certificate)}
                for n in sorted(certs)
            ],
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, (json.dumps(document, indent=2) + "\n").encode())
        except OSError as exc:
            raise Unavailable(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._certs, self._revision = certs, revision
        self._history.append(CertificateEvent(name, record, revision))
        if len(self._history) == HISTORY:
            self._oldest = self._history[0].revision - 1
        self._changed.notify_all()

    def _load(self) -> tuple[dict[str, CertificateRecord], int]:
        where = str(self.path)
        try:
            document: Any = json.loads(self.path.read_bytes())
        except OSError as exc:
            raise ConfigFileError(f"{where}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigFileError(f"{where}: not valid JSON ({exc}); restore it, or remove it and put the "
                                  "certificates again with lbctl certs put") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ConfigFileError(f"{where}: not a Fulcrum certificate store (format {FORMAT})")
        revision, entries = document.get("revision"), document.get("certificates")
        if not isinstance(revision, int) or not isinstance(entries, list):
            raise ConfigFileError(f"{where}: missing revision or certificates")
        certs: dict[str, CertificateRecord] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("revision"), int):
                raise ConfigFileError(f"{where}: certificates[{i}]: expected {{revision, certificate}}")
            body = entry.get("certificate")
            name = body.get("name") if isinstance(body, dict) else None
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                raise ConfigFileError(f"{where}: certificates[{i}].certificate.name: missing or not a name")
            try:
                cert = certificate_from_document(body, name)
            except CertificateError as exc:
                raise ConfigFileError(f"{where}: certificates[{i}] ({name}): {exc}") from None
            if name in certs:
                raise ConfigFileError(f'{where}: certificates[{i}]: certificate "{name}" appears twice')
            certs[name] = CertificateRecord(cert, entry["revision"])
        return certs, revision
