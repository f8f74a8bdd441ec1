"""Certificates in etcd (``{prefix}/certs/<name>``) against a real etcd: revisions, watch, garbage."""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lbnode.cluster.certstore import EtcdCertificates
from lbnode.cluster.etcd import EtcdStore
from lbnode.cluster.store import (
    AlreadyExists,
    CertificateEvent,
    CertificateResync,
    Conflict,
    NotFound,
    StopFlag,
    StoreError,
    Unavailable,
)
from lbnode.cluster.sync import StoreFollower
from lbnode.model import Config, NodeSettings
from lbnode.tls.certs import Certificate, load_certificate
from tests.integration.etcd_helpers import EtcdCluster, etcd_cluster
from tests.tlsgen import Issued, make_ca, make_leaf

_prefixes = itertools.count()
CA = make_ca()


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def pool_store(shared_etcd: EtcdCluster) -> Iterator[EtcdStore]:
    s = EtcdStore(shared_etcd.settings(prefix=f"/certs{next(_prefixes)}"))
    yield s
    s.close()


@pytest.fixture
def store(pool_store: EtcdStore) -> EtcdCertificates:
    return pool_store.certificates  # type: ignore[return-value]


def cert(name: str, *hosts: str) -> tuple[Certificate, Issued]:
    leaf = make_leaf(CA, list(hosts) or [f"{name}.example.com"])
    return load_certificate(name, leaf.cert_pem, leaf.key_pem), leaf


class Watch:
    def __init__(self, store: EtcdCertificates, after: int) -> None:
        self.items: queue.Queue[object] = queue.Queue()
        self.stop = StopFlag()
        self.thread = threading.Thread(target=self._run, args=(store, after), daemon=True)
        self.thread.start()

    def _run(self, store: EtcdCertificates, after: int) -> None:
        try:
            for item in store.watch_certificates(after, self.stop):
                self.items.put(item)
        except BaseException as exc:  # handed to the test
            self.items.put(exc)

    def next(self) -> CertificateEvent | CertificateResync:
        item = self.items.get(timeout=5)
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_put_get_list_delete_with_key_revisions(store: EtcdCertificates) -> None:
    web, leaf = cert("web", "www.example.com")
    created = store.put_certificate(web, expected_revision=0)
    assert created.revision > 0 and store.get_certificate("web") == created
    raw = store.conn.get(store.key("web"))
    assert raw is not None and raw.mod_revision == created.revision
    value = json.loads(raw.value)
    assert value["chain"].encode() == leaf.cert_pem and value["key"].encode() == leaf.key_pem
    assert value["names"] == ["www.example.com"] and value["fingerprint"] == web.fingerprint
    assert value["issuer"] == "CN=Test CA" and value["not_after"].endswith("Z")

    rotated, _ = cert("web", "www.example.com")
    replaced = store.put_certificate(rotated, expected_revision=created.revision)
    assert replaced.revision > created.revision
    assert store.get_certificate("web").certificate.fingerprint == rotated.fingerprint
    unconditional = store.put_certificate(web)
    assert store.list_certificates()[0] == [unconditional]
    store.delete_certificate("web", unconditional.revision)
    with pytest.raises(NotFound, match='certificate "web" does not exist'):
        store.get_certificate("web")
    with pytest.raises(NotFound):
        store.delete_certificate("web")


def test_compare_revision_writes_refuse_and_change_nothing(store: EtcdCertificates) -> None:
    first = store.put_certificate(cert("web")[0])
    second, _ = cert("web")
    with pytest.raises(AlreadyExists, match=rf'certificate "web" already exists \(revision {first.revision}\)'):
        store.put_certificate(second, expected_revision=0)
    with pytest.raises(Conflict, match=rf'certificate "web" changed since revision {first.revision - 1} '):
        store.put_certificate(second, expected_revision=first.revision - 1)
    with pytest.raises(Conflict):
        store.delete_certificate("web", first.revision - 1)
    with pytest.raises(NotFound):
        store.put_certificate(cert("api")[0], expected_revision=first.revision)
    assert store.get_certificate("web") == first


def test_watch_delivers_rotations_and_deletes_in_order_then_resyncs_after_compaction(
    store: EtcdCertificates, pool_store: EtcdStore
) -> None:
    _, revision = store.list_certificates()
    watch = Watch(store, revision)
    try:
        web, _ = cert("web")
        rotated, _ = cert("web")
        a = store.put_certificate(web)
        pool_store.conn.put(pool_store.key("x"), b"{}")  # a pool key: not this watch's business
        b = store.put_certificate(rotated)
        store.delete_certificate("web")
        assert watch.next() == CertificateEvent("web", a, a.revision)
        assert watch.next() == CertificateEvent("web", b, b.revision)
        gone = watch.next()
        assert isinstance(gone, CertificateEvent) and gone.record is None and gone.revision > b.revision
    finally:
        watch.close()

    last = store.put_certificate(cert("api")[0])
    store.conn.compact(last.revision)
    watch = Watch(store, revision)  # its history is gone
    try:
        resync = watch.next()
        assert isinstance(resync, CertificateResync) and resync.records == (last,)
        after = store.put_certificate(cert("api")[0])
        assert watch.next() == CertificateEvent("api", after, after.revision)
    finally:
        watch.close()


def test_garbage_is_logged_once_without_the_key_and_skipped(
    store: EtcdCertificates, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, revision = store.list_certificates()
    watch = Watch(store, revision)
    web, _ = cert("web")
    _, other = cert("other")
    mismatched = {"chain": web.chain_pem.decode(), "key": other.key_pem.decode()}
    try:
        good = store.put_certificate(web)
        store.conn.put(store.key("junk"), b"{not json")
        store.conn.put(store.key("mismatch"), json.dumps(mismatched).encode())
        store.conn.put(store.key("renamed"), json.dumps({**mismatched, "name": "web"}).encode())
        last = store.put_certificate(cert("web")[0])
        assert watch.next() == CertificateEvent("web", good, good.revision)
        assert watch.next() == CertificateEvent("web", last, last.revision)
        assert store.list_certificates()[0] == [last]
    finally:
        watch.close()
    for name, reason in (("junk", "Expecting property name"),
                         ("mismatch", "key: does not match the certificate's public key"),
                         ("renamed", 'name "web" does not match the key')):
        lines = [r.getMessage() for r in caplog.records if store.key(name) in r.getMessage()]
        assert len(lines) == 1, lines  # the watch and the list saw it: logged once
        assert reason in lines[0]
    assert not any("PRIVATE KEY" in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreError, match=f"{store.key('mismatch')}: the stored certificate is not valid"):
        store.get_certificate("mismatch")
    store.delete_certificate("mismatch")  # an operator removes garbage through the store


# --------------------------------------------------------------------------- followed by a node


async def test_a_follower_merges_etcd_certificates_over_node_toml_ones(pool_store: EtcdStore) -> None:
    file_www, _ = cert("www")
    file_only, _ = cert("fileonly")
    base = Config(node=NodeSettings(id="n1"), listeners=(), pools=(), certificates=(file_www, file_only))
    applied: list[Config] = [base]
    store = pool_store.certificates

    def served() -> dict[str, str]:
        return {c.name: c.fingerprint for c in applied[-1].certificates}

    async def until(expected: dict[str, str]) -> None:
        with trio.fail_after(5):  # a change takes milliseconds store -> watch -> apply
            while served() != expected:
                await trio.sleep(0.01)

    before = store.put_certificate(cert("api")[0])
    async with trio.open_nursery() as nursery:
        follower = StoreFollower(pool_store, lambda: applied[-1], applied.append)
        await nursery.start(follower.run)
        await until({"api": before.certificate.fingerprint, "www": file_www.fingerprint,
                     "fileonly": file_only.fingerprint})
        www = await trio.to_thread.run_sync(store.put_certificate, cert("www")[0])
        await until({"api": before.certificate.fingerprint, "www": www.certificate.fingerprint,
                     "fileonly": file_only.fingerprint})
        await trio.to_thread.run_sync(store.delete_certificate, "www")
        await trio.to_thread.run_sync(store.delete_certificate, "api")
        await until({"www": file_www.fingerprint, "fileonly": file_only.fingerprint})
        assert follower.certificate_revision > www.revision
        nursery.cancel_scope.cancel()


async def test_with_etcd_down_the_follower_keeps_serving_its_certificates_and_catches_up_after(
    tmp_path: Path,
) -> None:
    with etcd_cluster(tmp_path) as etcd:
        pool_store = EtcdStore(etcd.settings())
        store = pool_store.certificates
        try:
            first = store.put_certificate(cert("www")[0])
            base = Config(node=NodeSettings(id="n1"), listeners=(), pools=())
            applied: list[Config] = [base]

            def served() -> dict[str, str]:
                return {c.name: c.fingerprint for c in applied[-1].certificates}

            async def until(expected: dict[str, str], limit: float) -> None:
                with trio.fail_after(limit):
                    while served() != expected:
                        await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                follower = StoreFollower(pool_store, lambda: applied[-1], applied.append)
                await nursery.start(follower.run)
                await until({"www": first.certificate.fingerprint}, 5)
                etcd.members[0].kill()
                configs_before = len(applied)
                await trio.sleep(1.0)  # the watches break and retry with backoff meanwhile
                assert served() == {"www": first.certificate.fingerprint}  # static stability
                assert len(applied) == configs_before  # nothing was applied while etcd was away
                etcd.members[0].start()
                await trio.to_thread.run_sync(etcd.members[0].wait_healthy)
                # This client's channel may still be in its reconnect backoff (at most 1 s,
                # CHANNEL_OPTIONS) when etcd is healthy again: a write then fails fast with
                # Unavailable, as a control-API write would (the operator retries). Retry it.
                rotated = None
                with trio.fail_after(3):  # the backoff, with margin for 2 busy cores
                    while rotated is None:
                        try:
                            rotated = await trio.to_thread.run_sync(store.put_certificate, cert("www")[0])
                        except Unavailable:
                            await trio.sleep(0.1)
                # The follower retries every BACKOFF_MAX (5 s) at most, then reads everything again.
                await until({"www": rotated.certificate.fingerprint}, 5 + 5)
                nursery.cancel_scope.cancel()
        finally:
            pool_store.close()
