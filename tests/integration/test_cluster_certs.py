"""Certificates managed once for the whole cluster, end to end: a real etcd, three real ``lbnode run``
processes each with an https listener, lbctl and gRPC clients through node 1, and real TLS clients
(Python's ssl, verifying the chain and the name) making new handshakes against every node.

The listener names certificate "www", which node.toml does not define: it comes from the store.
Tests share one cluster (module fixture) and run in file order.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from tests.conftest import REPO, free_port, wait_port
from tests.integration.etcd_helpers import etcd_cluster, require_etcd
from tests.integration.test_cluster_lbctl import (
    NODES,
    Certs,
    Procs,
    certs_init,
    lbctl_env,
    percentile,
)
from tests.tlsgen import Issued, make_ca, make_leaf

TTL = 2.0  # node lease
SERVER_NAME = "www.example.com"
# Store write -> etcd watch -> new snapshot -> the next handshake: milliseconds by design (one
# etcd event, one snapshot build). 0.5 s is the bound of the pool propagation test on the same
# path: about 50x the design, for two busy cores.
PROPAGATION_P99 = 0.5
ROTATIONS_MEASURED = 30
ROTATIONS_UNDER_LOAD = 10
# Handshake clients in the load test: one per node, each a loop of new connections.
LOAD_CLIENTS_PER_NODE = 1


# --------------------------------------------------------------------------- the cluster


@dataclass
class Node:
    id: str
    https: int
    admin: int
    control: int
    proc: object

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.control}"


@dataclass
class Cluster:
    certs: Certs  # the control API's mutual TLS (lbctl certs init)
    home: Path
    ca: Issued  # the CA of the web certificates
    ca_file: Path
    nodes: list[Node] = field(default_factory=list)

    def lbctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lbctl.cli", "--endpoint", self.nodes[0].endpoint, *self.certs.flags(), *args],
            capture_output=True, text=True, cwd=REPO, timeout=60, env=lbctl_env(self.home),
        )

    def certificates_stub(self) -> tuple[grpc.Channel, rpc.CertificatesStub]:
        d = self.certs.dir
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(), private_key=(d / "client.key").read_bytes(),
            certificate_chain=(d / "client.pem").read_bytes(),
        )
        channel = grpc.secure_channel(self.nodes[0].endpoint, credentials)
        return channel, rpc.CertificatesStub(channel)

    def client_context(self) -> ssl.SSLContext:
        """What a browser does: verify the chain against the CA and the name against the SNI."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def new_leaf(self) -> Issued:
        return make_leaf(self.ca, [SERVER_NAME, "example.com"])


def _node_config(directory: Path, node_id: str, etcd, certs: Certs, backend: str) -> tuple[str, dict[str, int]]:
    ports = {"https": free_port(), "admin": free_port(), "control": free_port()}
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    text = f"""
[node]
id = "{node_id}"
admin = "127.0.0.1:{ports['admin']}"
state_dir = "{directory / node_id}"
drain_timeout = "1s"
workers = 1

[cluster]
etcd = [{endpoints}]
lease_ttl = "{TTL:g}s"

[control]
bind = "127.0.0.1:{ports['control']}"
ca = "{certs.dir / 'ca.pem'}"
cert = "{certs.dir / f'{node_id}.pem'}"
key = "{certs.dir / f'{node_id}.key'}"

[[listeners]]
name = "front"
protocol = "https"
bind = "127.0.0.1:{ports['https']}"
pool = "web"
  [listeners.tls]
  certificates = ["www"]

[[pools]]
name = "web"
  [[pools.backends]]
  address = "{backend}"
"""
    return text, ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_etcd()
    directory = tmp_path_factory.mktemp("cluster-certs")
    procs = Procs(directory)
    try:
        with etcd_cluster(directory, size=1) as etcd:
            certs = certs_init(directory / "control-certs")
            ca = make_ca("Web Test CA")
            ca_file = directory / "web-ca.pem"
            ca_file.write_bytes(ca.cert_pem)
            backend_port = free_port()
            procs.spawn("-m", "lbnode.demo_backend", "--name", "a", "--port", str(backend_port), name="backend-a")
            c = Cluster(certs, directory, ca, ca_file)
            for node_id in NODES:
                text, ports = _node_config(directory, node_id, etcd, certs, f"127.0.0.1:{backend_port}")
                config = directory / f"{node_id}.toml"
                config.write_text(text)
                proc = procs.spawn("-m", "lbnode.cli", "run", "--config", str(config), name=node_id)
                c.nodes.append(Node(node_id, ports["https"], ports["admin"], ports["control"], proc))
            for node in c.nodes:
                for port in (node.https, node.admin, node.control):
                    try:
                        wait_port(port, timeout=20)
                    except TimeoutError:
                        raise AssertionError(f"{node.id} did not start:\n{node.proc.log()[-3000:]}") from None  # type: ignore[attr-defined]
            wait_port(backend_port)
            yield c
    finally:
        procs.kill_all()


# --------------------------------------------------------------------------- clients


def served_fingerprint(context: ssl.SSLContext, port: int) -> str:
    """A new TCP connection and a full TLS handshake (SNI www.example.com): the leaf's SHA-256."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def fingerprint(issued: Issued) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(issued.cert.public_bytes(Encoding.DER)).hexdigest()


def https_get(tls: ssl.SSLSocket, *, close: bool) -> bytes:
    """One HTTP/1.1 request on an open TLS connection; returns the response head and body."""
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {SERVER_NAME}\r\n{'Connection: close' if close else ''}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the body")
        body += chunk
    return head + b"\r\n\r\n" + body


def put(stub: rpc.CertificatesStub, issued: Issued) -> pb.Certificate:
    return stub.PutCertificate(pb.PutCertificateRequest(name="www", chain_pem=issued.cert_pem,
                                                        key_pem=issued.key_pem), timeout=10)


def wait_served(c: Cluster, context: ssl.SSLContext, wanted: str, since: float, limit: float = 5.0) -> float:
    """Seconds from ``since`` until every node answered a new handshake with ``wanted``."""
    waiting = list(c.nodes)
    while waiting:
        waiting = [n for n in waiting if served_fingerprint(context, n.https) != wanted]
        assert time.monotonic() - since < limit, f"{[n.id for n in waiting]} never served {wanted[:12]}"
    return time.monotonic() - since


# --------------------------------------------------------------------------- tests


def test_a_certificate_put_through_node_1_is_served_by_every_node(cluster: Cluster) -> None:
    context = cluster.client_context()
    for node in cluster.nodes:  # nothing in the store yet: the handshake fails, the node goes on
        with pytest.raises((ssl.SSLError, ConnectionError)):
            served_fingerprint(context, node.https)
    first = cluster.new_leaf()
    crt, key = first.write(cluster.home, "www")
    done = cluster.lbctl("certs", "put", "www", "--cert", str(crt), "--key", str(key))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("certificate www stored (revision ")
    returned = time.monotonic()
    took = wait_served(cluster, context, fingerprint(first), returned)
    print(f"\nfirst put (lbctl): served by 3 nodes {took * 1000:.0f} ms after lbctl returned")
    for node in cluster.nodes:  # and it serves HTTP over it, with the chain verified
        with socket.create_connection(("127.0.0.1", node.https), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
                assert https_get(tls, close=True).startswith(b"HTTP/1.1 200")
    listed = cluster.lbctl("certs", "list")
    assert listed.returncode == 0 and " front " in listed.stdout.splitlines()[1]
    for node in cluster.nodes:  # each node's /status says what it serves (and never the key)
        with urllib.request.urlopen(f"http://127.0.0.1:{node.admin}/status", timeout=5) as response:
            status = response.read()
        assert json.loads(status)["certificates"]["www"]["fingerprint"] == fingerprint(first)
        assert b"PRIVATE KEY" not in status


def test_propagation_of_rotations_to_three_nodes(cluster: Cluster) -> None:
    context = cluster.client_context()
    leaves = [cluster.new_leaf() for _ in range(ROTATIONS_MEASURED)]  # made before: RSA/EC keygen is not measured
    channel, stub = cluster.certificates_stub()
    from_call, from_return, calls = [], [], []
    try:
        for issued in leaves:
            started = time.monotonic()
            put(stub, issued)
            returned = time.monotonic()
            calls.append(returned - started)
            wait_served(cluster, context, fingerprint(issued), returned)
            from_return.append(time.monotonic() - returned)
            from_call.append(time.monotonic() - started)
    finally:
        channel.close()
    from_return.sort()
    from_call.sort()
    print(f"\nPutCertificate -> etcd -> 3 nodes serving it to new handshakes, {len(leaves)} rotations: "
          f"after the call returned p50 {statistics.median(from_return) * 1000:.0f} ms, "
          f"p99 {percentile(from_return, 99) * 1000:.0f} ms, max {from_return[-1] * 1000:.0f} ms; "
          f"from the call's start p50 {statistics.median(from_call) * 1000:.0f} ms, "
          f"p99 {percentile(from_call, 99) * 1000:.0f} ms (the call itself: median "
          f"{statistics.median(calls) * 1000:.0f} ms)")
    assert percentile(from_call, 99) < PROPAGATION_P99


def test_rotation_under_load_no_failed_handshake_and_open_connections_keep_their_certificate(cluster: Cluster) -> None:
    context = cluster.client_context()
    channel, stub = cluster.certificates_stub()
    try:
        before = put(stub, cluster.new_leaf())
        wait_served(cluster, context, before.fingerprint, time.monotonic())
        # Keep-alive connections opened before the rotations, one per node.
        kept = []
        for node in cluster.nodes:
            raw = socket.create_connection(("127.0.0.1", node.https), timeout=5)
            tls = context.wrap_socket(raw, server_hostname=SERVER_NAME)
            assert https_get(tls, close=False).startswith(b"HTTP/1.1 200")
            kept.append(tls)
        stop = threading.Event()
        seen: Counter[str] = Counter()
        failures: list[str] = []
        handshakes = [0]
        lock = threading.Lock()

        def client(port: int) -> None:
            while not stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                        with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
                            der = tls.getpeercert(binary_form=True)
                            response = https_get(tls, close=True)
                    if not response.startswith(b"HTTP/1.1 200"):
                        raise ConnectionError(response[:80].decode(errors="replace"))
                    with lock:
                        handshakes[0] += 1
                        seen[hashlib.sha256(der or b"").hexdigest()] += 1
                except Exception as exc:  # any failure at all is what the test counts
                    with lock:
                        failures.append(f"127.0.0.1:{port}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(n.https,), daemon=True)
                   for n in cluster.nodes for _ in range(LOAD_CLIENTS_PER_NODE)]
        for t in threads:
            t.start()
        leaves = [cluster.new_leaf() for _ in range(ROTATIONS_UNDER_LOAD)]
        rotated = []
        started = time.monotonic()
        for issued in leaves:
            rotated.append(put(stub, issued).fingerprint)
            wait_served(cluster, context, rotated[-1], time.monotonic())
            time.sleep(0.2)  # let the load run on each certificate a while
        stop.set()
        for t in threads:
            t.join(10)
        took = time.monotonic() - started
    finally:
        channel.close()
    print(f"\nrotation under load: {ROTATIONS_UNDER_LOAD} rotations in {took:.1f} s, {handshakes[0]} new "
          f"handshakes + requests by {len(threads)} clients, {len(failures)} failed; "
          f"{len([f for f in rotated if seen[f]])} of the {len(rotated)} certificates seen by the clients")
    assert failures == [], failures[:5]
    assert handshakes[0] >= 10 * ROTATIONS_UNDER_LOAD  # the load really ran across the rotations
    assert sum(1 for f in rotated if seen[f]) >= ROTATIONS_UNDER_LOAD // 2
    for tls in kept:  # the connections opened before: untouched, still on the first certificate
        assert hashlib.sha256(tls.getpeercert(binary_form=True) or b"").hexdigest() == before.fingerprint
        assert https_get(tls, close=False).startswith(b"HTTP/1.1 200")
        tls.close()


def test_a_session_made_on_one_node_resumes_on_every_other(cluster: Cluster) -> None:
    """The nodes seal session tickets with the cluster's key (lbnode.cluster.ticketkey): a
    client that made a full handshake with node 1 resumes on nodes 2 and 3, in TLS 1.3 and 1.2,
    and their /status counts the resumptions."""
    def resumed(node: Node) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.admin}/status", timeout=5) as response:
            tls = json.loads(response.read())["listeners"]["front"]["tls"]
        assert tls["ticket_key"] == "shared"
        return int(tls["resumed"])

    issued = cluster.new_leaf()  # (whatever the tests before left: a certificate every node serves)
    channel, stub = cluster.certificates_stub()
    try:
        put(stub, issued)
    finally:
        channel.close()
    wait_served(cluster, cluster.client_context(), fingerprint(issued), time.monotonic())
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        context = cluster.client_context()
        context.maximum_version = version
        first, *others = cluster.nodes
        with socket.create_connection(("127.0.0.1", first.https), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
                assert https_get(tls, close=False).startswith(b"HTTP/1.1 200")  # (TLS 1.3: tickets read)
                session = tls.session
                assert not tls.session_reused
        before = [resumed(n) for n in others]
        for node in others:
            with socket.create_connection(("127.0.0.1", node.https), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname=SERVER_NAME, session=session) as tls:
                    assert tls.session_reused, f"{version.name}: {node.id} made a full handshake"
                    assert https_get(tls, close=True).startswith(b"HTTP/1.1 200")
        assert [resumed(n) for n in others] == [b + 1 for b in before]
