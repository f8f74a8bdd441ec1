"""Certificates through the control API of a standalone node: validation before storing, no key out, expiry.

A real LbNode following a real FileStore, the real gRPC server on 127.0.0.1, and
real gRPC clients (called from worker threads: the node keeps running meanwhile).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from lbnode.cluster.filestore import FileStore
from lbnode.config import load_config_text
from lbnode.node import LbNode
from lbnode.tls.certs import load_certificate
from tests.conftest import listener_toml, node_toml, pool_toml
from tests.integration.test_control_api import ControlNode, eventually, start_control_node
from tests.tlsgen import Issued, make_ca, make_leaf, new_key

CA = make_ca("Cert Test CA")
INTERMEDIATE = make_ca("Cert Test Intermediate", issuer=CA)


def leaf(*names: str, **kw: Any) -> Issued:
    return make_leaf(INTERMEDIATE, list(names) or ["www.example.com"], **kw)


def nameless() -> Issued:
    """A certificate with neither a DNS SAN nor a common name (only an organization)."""
    key = new_key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "No Name Inc")]))
        .issuer_name(INTERMEDIATE.cert.subject)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(INTERMEDIATE.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return Issued(cert, key)


def chain(issued: Issued) -> bytes:
    return issued.cert_pem + INTERMEDIATE.cert_pem


async def call(cn: ControlNode, method: str, request: Any) -> Any:
    """One Certificates call from a worker thread; returns the response or the RpcError."""

    def run() -> Any:
        with cn.channel() as channel:
            try:
                return getattr(rpc.CertificatesStub(channel), method)(request, timeout=10)
            except grpc.RpcError as exc:
                return exc

    return await trio.to_thread.run_sync(run)


async def node(nursery: trio.Nursery, tmp_path: Path) -> ControlNode:
    return await start_control_node(nursery, tmp_path / "state", pool_toml("web", ["127.0.0.1:9"]))


def refused(result: Any) -> tuple[grpc.StatusCode, str]:
    assert isinstance(result, grpc.RpcError), result
    return result.code(), result.details()


async def test_put_get_list_delete_and_the_key_never_comes_back(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cn = await node(nursery, tmp_path)
    issued = leaf("www.example.com", "*.api.example.com", kind="rsa")
    put = await call(cn, "PutCertificate", pb.PutCertificateRequest(name="www", chain_pem=chain(issued),
                                                                    key_pem=issued.key_pem))
    assert isinstance(put, pb.Certificate), put
    assert (put.name, list(put.names), put.key_type, put.chain_length) == (
        "www", ["www.example.com", "*.api.example.com"], "RSA 2048", 2)
    assert put.issuer == "CN=Cert Test Intermediate" and put.expiry == "ok" and put.source == "store"
    assert put.revision == 1 and put.chain_pem.encode() == chain(issued)
    assert put.not_after.ToDatetime(tzinfo=UTC) == issued.cert.not_valid_after_utc

    got = await call(cn, "GetCertificate", pb.GetCertificateRequest(name="www"))
    listed = await call(cn, "ListCertificates", pb.ListCertificatesRequest())
    assert got == put
    assert [c.name for c in listed.certificates] == ["www"] and listed.revision == 1
    assert listed.certificates[0].chain_pem == ""  # List stays small: metadata only
    key_body = issued.key_pem.splitlines()[1]  # a line of the key's base64
    for message in (put, got, listed):
        wire = message.SerializeToString()
        assert b"PRIVATE KEY" not in wire and key_body not in wire
    stored = json.loads((tmp_path / "state" / "certificates.json").read_text())
    assert stored["certificates"][0]["certificate"]["key"].encode() == issued.key_pem  # the node needs it
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "certificate www put by" in text and put.fingerprint in text
    assert "PRIVATE KEY" not in text and key_body.decode() not in text

    assert isinstance(await call(cn, "DeleteCertificate", pb.DeleteCertificateRequest(name="www")),
                      pb.DeleteCertificateResponse)
    assert refused(await call(cn, "GetCertificate", pb.GetCertificateRequest(name="www"))) == (
        grpc.StatusCode.NOT_FOUND, 'certificate "www" does not exist')
    assert refused(await call(cn, "DeleteCertificate", pb.DeleteCertificateRequest(name="www")))[0] == (
        grpc.StatusCode.NOT_FOUND)


async def test_a_bad_certificate_is_invalid_argument_in_one_line_and_nothing_is_stored(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    cn = await node(nursery, tmp_path)
    good, other = leaf(), leaf()
    anonymous = nameless()
    cases: dict[str, tuple[pb.PutCertificateRequest, str]] = {
        "mismatched key": (pb.PutCertificateRequest(name="web", chain_pem=chain(good), key_pem=other.key_pem),
                           "key: does not match the certificate's public key"),
        "not PEM": (pb.PutCertificateRequest(name="web", chain_pem=b"\x30\x82garbage", key_pem=good.key_pem),
                    "cert: no PEM certificate found"),
        "chain out of order": (pb.PutCertificateRequest(name="web", chain_pem=INTERMEDIATE.cert_pem + good.cert_pem,
                                                        key_pem=good.key_pem), "cert: certificate 1 of the chain"),
        "no name": (pb.PutCertificateRequest(name="web", chain_pem=anonymous.cert_pem, key_pem=anonymous.key_pem),
                    "has no DNS name"),
        "key is a certificate": (pb.PutCertificateRequest(name="web", chain_pem=chain(good), key_pem=good.cert_pem),
                                 "key: no PEM private key found"),
        "no key": (pb.PutCertificateRequest(name="web", chain_pem=chain(good)), "key_pem: is required (PEM)"),
        "bad name": (pb.PutCertificateRequest(name="web/../x", chain_pem=chain(good), key_pem=good.key_pem),
                     'name: "web/../x" is not a name'),
        "no name given": (pb.PutCertificateRequest(chain_pem=chain(good), key_pem=good.key_pem), "name: is required"),
        "huge": (pb.PutCertificateRequest(name="web", chain_pem=chain(good) * 200, key_pem=good.key_pem),
                 "chain_pem: is "),
    }
    for what, (request, expected) in cases.items():
        code, details = refused(await call(cn, "PutCertificate", request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, what
        assert expected in details and "\n" not in details, f"{what}: {details}"
        for secret in (good.key_pem, other.key_pem, anonymous.key_pem):
            assert secret.splitlines()[1].decode() not in details, what  # no line of any key echoed
    listed = await call(cn, "ListCertificates", pb.ListCertificatesRequest())
    assert list(listed.certificates) == [] and listed.revision == 0
    assert not (tmp_path / "state" / "certificates.json").exists()


async def test_revisions_guard_creates_and_rotations(nursery: trio.Nursery, tmp_path: Path) -> None:
    cn = await node(nursery, tmp_path)

    def put(issued: Issued, **kw: int) -> pb.PutCertificateRequest:
        return pb.PutCertificateRequest(name="web", chain_pem=chain(issued), key_pem=issued.key_pem, **kw)

    first = await call(cn, "PutCertificate", put(leaf(), expected_revision=0))
    assert first.revision == 1
    code, details = refused(await call(cn, "PutCertificate", put(leaf(), expected_revision=0)))
    assert code == grpc.StatusCode.ALREADY_EXISTS and details == 'certificate "web" already exists (revision 1)'
    rotated = await call(cn, "PutCertificate", put(leaf(), expected_revision=1))
    assert rotated.revision == 2 and rotated.fingerprint != first.fingerprint
    code, details = refused(await call(cn, "PutCertificate", put(leaf(), expected_revision=1)))
    assert code == grpc.StatusCode.ABORTED and details.startswith('certificate "web" changed since revision 1')
    code, _ = refused(await call(cn, "DeleteCertificate", pb.DeleteCertificateRequest(name="web", expected_revision=1)))
    assert code == grpc.StatusCode.ABORTED
    latest = await call(cn, "GetCertificate", pb.GetCertificateRequest(name="web"))
    assert latest.fingerprint == rotated.fingerprint


async def test_expiring_and_expired_certificates_are_flagged_and_warned_but_stored(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cn = await node(nursery, tmp_path)
    now = datetime.now(UTC)
    soon = leaf("soon.example.com", not_after=now + timedelta(days=5))
    gone = leaf("gone.example.com", not_before=now - timedelta(days=90), not_after=now - timedelta(days=1))
    later = leaf("later.example.com", not_after=now + timedelta(days=20))
    for name, issued in (("soon", soon), ("gone", gone), ("later", later)):
        done = await call(cn, "PutCertificate", pb.PutCertificateRequest(name=name, chain_pem=chain(issued),
                                                                         key_pem=issued.key_pem))
        assert isinstance(done, pb.Certificate), done
    listed = await call(cn, "ListCertificates", pb.ListCertificatesRequest())
    assert {c.name: c.expiry for c in listed.certificates} == {"gone": "expired", "later": "ok", "soon": "expiring"}

    def warnings(name: str) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.getMessage().startswith(f"certificate {name} ")]

    async def warned() -> bool:
        return bool(warnings("soon") and warnings("gone"))

    await eventually(warned, "the node warns about the expiring and the expired certificate")
    assert set(cn.node.snapshot.certificates) == {"soon", "gone", "later"}  # all served
    assert len(warnings("soon")) == 1 and "expires in 5.0 days" in warnings("soon")[0]
    assert len(warnings("gone")) == 1 and "EXPIRED on" in warnings("gone")[0] and "still served" in warnings("gone")[0]
    assert warnings("later") == []


# --------------------------------------------------------------------------- store + node.toml, followed


async def start_with_file_certificates(nursery: trio.Nursery, tmp_path: Path) -> tuple[ControlNode, dict[str, Issued]]:
    """A standalone node whose node.toml has [[certificates]] www and other, and a TLS listener naming www and new."""
    files = {"www": leaf("www.example.com"), "other": leaf("other.example.com")}
    entries = ""
    for name, issued in files.items():
        crt, key = issued.write(tmp_path, name, chain=(INTERMEDIATE,))
        entries += f'[[certificates]]\nname = "{name}"\ncert = "{crt}"\nkey = "{key}"\n\n'
    state = tmp_path / "state"
    config = load_config_text(
        node_toml(pool_toml("web", ["127.0.0.1:9"]), listener_toml("front", "http", "web"),
                  listener_toml("secure", "tls", "web", extra='  [listeners.tls]\n  certificates = ["www", "new"]\n'),
                  entries, '[control]\nbind = "127.0.0.1:0"\ninsecure = true\n',
                  node_id="n1", node_extra=f'state_dir = "{state}"\n'),
        "test.toml",
    )
    store = FileStore(state, config.pools)
    lbnode = LbNode(config, store)
    bound = await nursery.start(lambda task_status: lbnode.run(handle_signals=False, task_status=task_status))
    assert lbnode.control_port is not None  # [control]: the node serves its API itself
    return ControlNode(lbnode, bound, lbnode.control_port, store, ["--insecure"]), files


def fingerprints(cn: ControlNode) -> dict[str, str]:
    return {name: c.fingerprint for name, c in cn.node.snapshot.certificates.items()}


async def test_the_store_wins_a_name_and_node_toml_certificates_stay_for_the_others(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cn, files = await start_with_file_certificates(nursery, tmp_path)
    original = {name: load_certificate(name, chain(i), i.key_pem).fingerprint for name, i in files.items()}
    assert fingerprints(cn) == original

    listed = await call(cn, "ListCertificates", pb.ListCertificatesRequest())
    assert [(c.name, c.source, c.revision, list(c.listeners)) for c in listed.certificates] == [
        ("other", "config", 0, []), ("www", "config", 0, ["secure"])]
    shown = await call(cn, "GetCertificate", pb.GetCertificateRequest(name="other"))
    assert shown.source == "config" and shown.chain_pem.encode() == chain(files["other"])
    code, details = refused(await call(cn, "DeleteCertificate", pb.DeleteCertificateRequest(name="other")))
    assert code == grpc.StatusCode.NOT_FOUND and "comes from [[certificates]] in this node's node.toml" in details

    rotated, new = leaf("www.example.com"), leaf("new.example.com")
    for name, issued in (("www", rotated), ("new", new)):
        put = await call(cn, "PutCertificate", pb.PutCertificateRequest(name=name, chain_pem=chain(issued),
                                                                        key_pem=issued.key_pem))
        assert list(put.listeners) == ["secure"]
    wanted = {**original, "www": put_fp(rotated, "www"), "new": put_fp(new, "new")}

    async def follows(expected: dict[str, str]) -> bool:
        return fingerprints(cn) == expected

    await eventually(lambda: follows(wanted), "the node serves the store's www (rotated) and new, node.toml's other")
    listed = await call(cn, "ListCertificates", pb.ListCertificatesRequest())
    assert [(c.name, c.source) for c in listed.certificates] == [("new", "store"), ("other", "config"), ("www", "store")]

    await call(cn, "DeleteCertificate", pb.DeleteCertificateRequest(name="www"))
    await call(cn, "DeleteCertificate", pb.DeleteCertificateRequest(name="new"))
    await eventually(lambda: follows(original), "node.toml's www is served again once the store's is deleted")
    lines = [r.getMessage() for r in caplog.records if r.name == "lbnode.cluster"]
    assert any(line.startswith("certificate www added (store revision 1): www.example.com") for line in lines), lines
    assert "certificate www deleted from the store; serving node.toml's [[certificates]] entry again" in lines
    assert "certificate new deleted from the store; serving nothing: handshakes that need it fail" in lines


def put_fp(issued: Issued, name: str) -> str:
    return load_certificate(name, chain(issued), issued.key_pem).fingerprint


async def test_a_restarted_standalone_node_serves_the_stored_certificates(nursery: trio.Nursery, tmp_path: Path) -> None:
    issued = leaf("kept.example.com")
    async with trio.open_nursery() as first:
        cn, _ = await start_with_file_certificates(first, tmp_path)
        await call(cn, "PutCertificate", pb.PutCertificateRequest(name="www", chain_pem=chain(issued),
                                                                  key_pem=issued.key_pem))
        first.cancel_scope.cancel()
    again, _ = await start_with_file_certificates(nursery, tmp_path)
    assert again.node.snapshot.certificates["www"].fingerprint == put_fp(issued, "www")


# --------------------------------------------------------------------------- lbctl certs


@pytest.fixture(autouse=True)
def _no_lbctl_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("LBCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


async def test_lbctl_certs_put_list_show_delete_in_tables_and_json(nursery: trio.Nursery, tmp_path: Path) -> None:
    cn, files = await start_with_file_certificates(nursery, tmp_path)
    issued = leaf("www.example.com", "example.com", "a.example.com", "b.example.com")
    crt, key = issued.write(tmp_path, "rotated", chain=(INTERMEDIATE,))
    out = await cn.ok("certs", "put", "www", "--cert", str(crt), "--key", str(key))
    assert out.startswith("certificate www stored (revision 1): www.example.com, example.com, a.example.com (+1); "
                          "ECDSA P-256; not after ")
    assert out.rstrip().endswith(": ok")

    table = (await cn.ok("certs", "list")).splitlines()
    assert table[0].split() == ["NAME", "NAMES", "ISSUER", "NOT", "AFTER", "EXPIRY", "LISTENERS", "SOURCE", "REVISION"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == {"other", "www"}
    assert "CN=Cert Test Intermediate" in rows["www"] and rows["www"].split()[-5:] == ["UTC", "ok", "secure", "store", "1"]
    assert rows["other"].split()[-3:] == ["-", "config", "-"]

    listed = json.loads(await cn.ok("-o", "json", "certs", "list"))
    assert listed["revision"] == 1
    www = next(c for c in listed["certificates"] if c["name"] == "www")
    assert www["names"] == ["www.example.com", "example.com", "a.example.com", "b.example.com"]
    assert www["expiry"] == "ok" and www["listeners"] == ["secure"] and www["chain_pem"] == ""
    assert "key" not in json.dumps(listed).lower().replace("key_type", "")

    shown = await cn.ok("certs", "show", "www")
    assert shown.splitlines()[0] == "certificate www (store, revision 1)"
    assert "  chain        2 certificates (leaf first)" in shown and "  listeners    secure" in shown
    assert "PRIVATE KEY" not in shown
    as_json = json.loads(await cn.ok("certs", "show", "www", "-o", "json"))
    assert as_json["chain_pem"].encode() == chain(issued) and "PRIVATE KEY" not in json.dumps(as_json)
    assert (await cn.ok("certs", "show", "other")).splitlines()[0] == "certificate other (node.toml of this node)"

    code, _, err = await cn.lbctl("certs", "delete", "www", "--revision", "9")
    assert code == 1 and err.startswith('lbctl: ABORTED: certificate "www" changed since revision 9')
    assert (await cn.ok("certs", "delete", "www")).strip() == "certificate www deleted"
    code, _, err = await cn.lbctl("certs", "show", "gone")
    assert (code, err) == (1, 'lbctl: NOT_FOUND: certificate "gone" does not exist\n')


async def test_lbctl_certs_put_refusals_are_one_line(nursery: trio.Nursery, tmp_path: Path) -> None:
    cn, _ = await start_with_file_certificates(nursery, tmp_path)
    good, other = leaf(), leaf()
    crt, _ = good.write(tmp_path, "good")
    _, wrong_key = other.write(tmp_path, "other")
    code, out, err = await cn.lbctl("certs", "put", "www", "--cert", str(crt), "--key", str(wrong_key))
    assert code == 1 and out == ""
    assert err.startswith("lbctl: INVALID_ARGUMENT: key: does not match the certificate's public key")
    assert err.count("\n") == 1
    code, _, err = await cn.lbctl("certs", "put", "www", "--cert", str(tmp_path / "missing.pem"), "--key", str(wrong_key))
    assert (code, err) == (1, f"lbctl: --cert: cannot read {tmp_path / 'missing.pem'}: No such file or directory\n")
    code, _, err = await cn.lbctl("certs", "put", "www", "--cert", str(crt))
    assert code == 2 and "the following arguments are required: --key" in err
    listed = json.loads(await cn.ok("-o", "json", "certs", "list"))
    assert listed["revision"] == 0  # nothing was stored


def test_lbctl_certs_put_takes_its_own_cert_and_key_after_the_command_and_the_clients_before() -> None:
    from lbctl.cli import build_parser

    args = build_parser().parse_args(["--cert", "client.pem", "--key", "client.key", "certs", "put", "www",
                                      "--cert", "www.pem", "--key", "www.key", "-e", "127.0.0.1:7443"])
    assert (args.cert, args.key) == ("client.pem", "client.key")
    assert (args.cert_file, args.key_file, args.endpoint) == ("www.pem", "www.key", ["127.0.0.1:7443"])


async def test_watch_events_report_certificate_changes_the_node_applied(nursery: trio.Nursery, tmp_path: Path) -> None:
    from lbctl.cli import describe_event

    cn, _ = await start_with_file_certificates(nursery, tmp_path)
    channel = cn.channel()
    stream = rpc.ClusterStub(channel).WatchEvents(pb.WatchEventsRequest())
    await trio.to_thread.run_sync(stream.initial_metadata)  # subscribed from here on
    first, second = leaf("www.example.com"), leaf("www.example.com")
    for issued in (first, second):
        await call(cn, "PutCertificate", pb.PutCertificateRequest(name="www", chain_pem=chain(issued),
                                                                  key_pem=issued.key_pem))
    await call(cn, "DeleteCertificate", pb.DeleteCertificateRequest(name="www"))

    def three() -> list[pb.Event]:
        events = []
        for event in stream:
            if event.WhichOneof("event") == "certificate":
                events.append(event)
                if len(events) == 3:
                    return events
        return events

    with trio.fail_after(5):  # store -> watch -> snapshot takes milliseconds
        events = await trio.to_thread.run_sync(three)
    stream.cancel()
    channel.close()
    changes = [(e.certificate.name, e.certificate.change, e.certificate.fingerprint, e.certificate.revision)
               for e in events]
    assert changes == [
        ("www", pb.CertificateChanged.ADDED, put_fp(first, "www"), 1),
        ("www", pb.CertificateChanged.ROTATED, put_fp(second, "www"), 2),
        ("www", pb.CertificateChanged.DELETED, "", 3),
    ]
    assert events[1].certificate.not_after.ToDatetime(tzinfo=UTC) == second.cert.not_valid_after_utc
    line = describe_event(events[1])
    assert line.endswith(f"n1 certificate www rotated (revision 2, sha256 {put_fp(second, 'www')[:16]}..., "
                         f"not after {second.cert.not_valid_after_utc.strftime('%Y-%m-%d %H:%M UTC')})")
    assert describe_event(events[2]).endswith("n1 certificate www deleted (revision 3)")
