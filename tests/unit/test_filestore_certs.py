"""Certificates in the standalone store: state_dir/certificates.json (0600), revisions, watch, bad files."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from lbnode.cluster.filestore import FileStore
from lbnode.cluster.store import (
    AlreadyExists,
    CertificateEvent,
    CertificateResync,
    Conflict,
    NotFound,
    StopFlag,
)
from lbnode.config import ConfigFileError
from lbnode.tls.certs import Certificate, load_certificate
from tests.tlsgen import Issued, make_ca, make_leaf

CA = make_ca()


def cert(name: str, *hosts: str) -> tuple[Certificate, Issued]:
    leaf = make_leaf(CA, list(hosts) or [f"{name}.example.com"])
    return load_certificate(name, leaf.cert_pem, leaf.key_pem), leaf


def test_put_get_list_delete_with_one_revision_counter(tmp_path: Path) -> None:
    store = FileStore(tmp_path, []).certificates
    assert store.list_certificates() == ([], 0)
    web, _ = cert("web")
    api, _ = cert("api")
    assert store.put_certificate(web).revision == 1
    assert store.put_certificate(api, expected_revision=0).revision == 2
    rotated, _ = cert("web")
    record = store.put_certificate(rotated, expected_revision=1)
    assert record.revision == 3 and store.get_certificate("web") == record
    assert [r.certificate.name for r in store.list_certificates()[0]] == ["api", "web"]
    store.delete_certificate("api", expected_revision=2)
    with pytest.raises(NotFound, match='certificate "api" does not exist'):
        store.get_certificate("api")
    assert store.list_certificates()[1] == 4


def test_compare_revision_writes_refuse_and_change_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path, []).certificates
    first, _ = cert("web")
    record = store.put_certificate(first)
    second, _ = cert("web")
    with pytest.raises(AlreadyExists, match=rf'certificate "web" already exists \(revision {record.revision}\)'):
        store.put_certificate(second, expected_revision=0)
    with pytest.raises(Conflict, match=r'certificate "web" changed since revision 7 \(now at 1\)'):
        store.put_certificate(second, expected_revision=7)
    with pytest.raises(Conflict):
        store.delete_certificate("web", expected_revision=7)
    with pytest.raises(NotFound):
        store.put_certificate(cert("api")[0], expected_revision=3)
    with pytest.raises(NotFound):
        store.delete_certificate("api")
    assert store.get_certificate("web") == record


def test_the_file_is_0600_holds_chain_key_and_metadata_and_survives_reopening(tmp_path: Path) -> None:
    store = FileStore(tmp_path, []).certificates
    web, leaf = cert("web", "www.example.com", "*.example.com")
    store.put_certificate(web)
    path = tmp_path / "certificates.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    document = json.loads(path.read_text())
    (entry,) = document["certificates"]
    body = entry["certificate"]
    assert body["chain"].encode() == leaf.cert_pem and body["key"].encode() == leaf.key_pem
    assert body["names"] == ["www.example.com", "*.example.com"]
    assert body["fingerprint"] == web.fingerprint and body["issuer"] == "CN=Test CA"
    assert body["not_after"] == web.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certificates.json", "pools.json", "routes.json"]  # no temp file

    reopened = FileStore(tmp_path, []).certificates
    assert reopened.get_certificate("web").certificate == web
    assert reopened.put_certificate(cert("api")[0]).revision == 2  # the counter goes on


def test_a_damaged_file_is_one_line_naming_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "certificates.json"
    path.write_text("{nope")
    with pytest.raises(ConfigFileError, match=r"certificates\.json: not valid JSON"):
        FileStore(tmp_path, [])
    web, _ = cert("web")
    _, other = cert("other")
    body = {"name": "web", "chain": web.chain_pem.decode(), "key": other.key_pem.decode()}
    path.write_text(json.dumps({"format": 1, "revision": 1, "certificates": [{"revision": 1, "certificate": body}]}))
    with pytest.raises(ConfigFileError) as caught:
        FileStore(tmp_path, [])
    message = str(caught.value)
    assert r"certificates[0] (web): key: does not match the certificate's public key" in message
    assert "\n" not in message and "PRIVATE KEY" not in message


def test_watch_delivers_puts_and_deletes_in_order_and_stops_promptly(tmp_path: Path) -> None:
    store = FileStore(tmp_path, []).certificates
    got: list[CertificateEvent | CertificateResync] = []
    stop = StopFlag()
    thread = threading.Thread(target=lambda: got.extend(store.watch_certificates(0, stop)))
    thread.start()
    web, _ = cert("web")
    rotated, _ = cert("web")
    store.put_certificate(web)
    store.put_certificate(rotated)
    store.delete_certificate("web")
    for _ in range(100):
        if len(got) == 3:
            break
        threading.Event().wait(0.02)
    stop.set()
    thread.join(timeout=1)  # STOP_POLL is 0.1 s
    assert not thread.is_alive()
    assert [(e.name, e.revision) for e in got if isinstance(e, CertificateEvent)] == [("web", 1), ("web", 2), ("web", 3)]
    assert got[1].record is not None and got[1].record.certificate == rotated  # type: ignore[union-attr]
    assert got[2].record is None  # type: ignore[union-attr]


def test_watch_from_before_the_store_opened_starts_with_a_resync(tmp_path: Path) -> None:
    FileStore(tmp_path, []).certificates.put_certificate(cert("web")[0])
    store = FileStore(tmp_path, []).certificates
    stop = StopFlag()
    for event in store.watch_certificates(0, stop):
        assert isinstance(event, CertificateResync)
        assert event.revision == 1 and [r.certificate.name for r in event.records] == ["web"]
        break
