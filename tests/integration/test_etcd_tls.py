"""etcd over TLS with client certificates: a real etcd (--client-cert-auth) on loopback, certificates
from ``lbctl certs init --etcd-members``, a real lbnode process, and clients that must be refused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lbctl.certs import init_etcd_certs
from lbnode.cluster.etcd import EtcdConnection, EtcdStore, EtcdTls, connect
from lbnode.cluster.store import StopFlag, Unavailable
from tests.conftest import REPO, free_port, spawn_backend, wait_port

# A node registers, seeds its pool and serves within a second or two here; 20 s leaves room for
# two busy cores (process start-up alone is ~1 s of CPU).
JOIN_WITHIN = 20.0


def node_config(tmp_path: Path, endpoints: tuple[str, ...], backend: int, tls: dict[str, str]) -> tuple[Path, int, int]:
    http, admin = free_port(), free_port()
    files = "".join(f'{key} = "{value}"\n' for key, value in tls.items())
    config = tmp_path / "n1.toml"
    config.write_text(
        f"""
[node]
id = "n1"
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'n1'}"
workers = 1

[cluster]
etcd = [{", ".join(f'"{e}"' for e in endpoints)}]
lease_ttl = "2s"
{files}
[[listeners]]
name = "web"
protocol = "http"
bind = "127.0.0.1:{http}"
pool = "web"

[[pools]]
name = "web"
  [[pools.backends]]
  address = "127.0.0.1:{backend}"
"""
    )
    return config, http, admin


def tls_files(directory: Path) -> dict[str, str]:
    return {"etcd_ca": str(directory / "ca.pem"), "etcd_cert": str(directory / "client.pem"),
            "etcd_key": str(directory / "client.key")}


def test_a_node_joins_a_tls_etcd_and_serves(spawn, tmp_path: Path, etcd_tls) -> None:  # type: ignore[no-untyped-def]
    backend = spawn_backend(spawn, "a")
    config, http, admin = node_config(tmp_path, etcd_tls.endpoints, backend, tls_files(etcd_tls.tls))
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="n1")
    wait_port(http, JOIN_WITHIN)
    assert httpx.get(f"http://127.0.0.1:{http}/", timeout=5).headers["x-backend"] == "a"

    # Through etcd, over TLS: the node registered itself and seeded its pool.
    store = EtcdStore(etcd_tls.settings(), connection=connect(etcd_tls.settings()))
    deadline = time.monotonic() + JOIN_WITHIN
    while True:
        keys = [kv.key for kv in store.conn.get_prefix("/fulcrum/v1/nodes/")[0]]
        if keys or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert keys == ["/fulcrum/v1/nodes/n1"], node.log()
    assert [r.pool.name for r in store.list_pools()[0]] == ["web"]
    # It follows etcd: a change made there is served.
    other = spawn_backend(spawn, "b")
    pool = store.get_pool("web")
    from dataclasses import replace

    from lbnode.model import Backend, parse_address

    store.update_pool(replace(pool.pool, backends=(Backend(parse_address(f"127.0.0.1:{other}", "b")),)), pool.revision)
    deadline = time.monotonic() + JOIN_WITHIN
    while httpx.get(f"http://127.0.0.1:{http}/", timeout=5).headers.get("x-backend") != "b":
        assert time.monotonic() < deadline, "the pool change over TLS etcd never reached the node"
        time.sleep(0.1)
    assert "plain http" not in node.log()
    # Its lease is kept alive over TLS too (keepalives run on a second connection with a short
    # deadline, which must carry the same credentials): two TTLs later the node is still
    # registered under the same lease.
    lease = store.conn.get_prefix("/fulcrum/v1/nodes/")[0][0].lease
    time.sleep(2 * 2.0)
    kvs = store.conn.get_prefix("/fulcrum/v1/nodes/")[0]
    assert [(kv.key, kv.lease) for kv in kvs] == [("/fulcrum/v1/nodes/n1", lease)], node.log()


def test_etcd_refuses_clients_without_its_certificate_and_a_wrong_ca_is_named(etcd_tls, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tls = etcd_tls.tls
    ca = (tls / "ca.pem").read_bytes()
    good = connect(etcd_tls.settings())
    good.put("/probe", b"1")

    no_cert = EtcdConnection(etcd_tls.endpoints, tls=EtcdTls(ca))
    with pytest.raises(Unavailable) as caught:
        no_cert.get("/probe")
    assert str(caught.value).endswith(
        "TLS: etcd refused this node's client certificate (cluster.etcd_cert, etcd_key): "
        "missing, or not signed by the CA etcd trusts (--trusted-ca-file)")

    with pytest.raises(Unavailable) as caught:  # a watch says the same
        next(iter(no_cert.watch_prefix("/", 1, StopFlag())))
    assert str(caught.value).endswith("missing, or not signed by the CA etcd trusts (--trusted-ca-file)")

    init_etcd_certs(tmp_path / "other", {"x": []})  # another CA, and a client certificate it signed
    foreign = (tmp_path / "other" / "client.pem").read_bytes(), (tmp_path / "other" / "client.key").read_bytes()
    with pytest.raises(Unavailable, match="etcd refused this node's client certificate"):
        EtcdConnection(etcd_tls.endpoints, tls=EtcdTls(ca, *foreign)).get("/probe")

    wrong_ca = (tmp_path / "other" / "ca.pem").read_bytes()
    own = (tls / "client.pem").read_bytes(), (tls / "client.key").read_bytes()
    with pytest.raises(Unavailable) as caught:
        EtcdConnection(etcd_tls.endpoints, tls=EtcdTls(wrong_ca, *own)).get("/probe")
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert str(caught.value).endswith(
        "TLS: etcd's certificate is not trusted: is it signed by the CA in cluster.etcd_ca, "
        "and valid for the endpoint's address?")

    plain = EtcdConnection([etcd_tls.endpoints[0].replace("https://", "http://")])
    with pytest.raises(Unavailable):
        plain.get("/probe")
    assert good.get("/probe") is not None  # etcd itself is fine throughout


def test_a_node_with_the_wrong_etcd_ca_logs_why_and_serves_its_file(spawn, tmp_path: Path, etcd_tls) -> None:  # type: ignore[no-untyped-def]
    backend = spawn_backend(spawn, "a")
    init_etcd_certs(tmp_path / "other", {"x": []})
    files = tls_files(etcd_tls.tls) | {"etcd_ca": str(tmp_path / "other" / "ca.pem")}
    config, http, _ = node_config(tmp_path, etcd_tls.endpoints, backend, files)
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="n1")
    wait_port(http, JOIN_WITHIN)
    assert httpx.get(f"http://127.0.0.1:{http}/", timeout=5).headers["x-backend"] == "a"  # static stability
    deadline = time.monotonic() + JOIN_WITHIN
    while "TLS: etcd's certificate is not trusted" not in node.log():
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.1)


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbnode.cli", "check", "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_lbnode_check_names_an_unreadable_certificate_file(tmp_path: Path) -> None:
    init_etcd_certs(tmp_path / "etcd", {"m1": []})
    files = tls_files(tmp_path / "etcd")
    config, _, _ = node_config(tmp_path, ("https://127.0.0.1:2379",), 1, files)
    done = check(config)
    assert done.returncode == 0, done.stderr

    config, _, _ = node_config(tmp_path, ("https://127.0.0.1:2379",), 1, files | {"etcd_key": str(tmp_path / "nope.key")})
    done = check(config)
    assert done.returncode == 1
    assert done.stderr == f"lbnode: {config}: cluster.etcd_key: cannot read {tmp_path / 'nope.key'}: No such file or directory\n"

    config, _, _ = node_config(tmp_path, ("https://127.0.0.1:2379",), 1, files | {"etcd_ca": files["etcd_key"]})
    done = check(config)
    assert done.returncode == 1 and done.stderr.startswith(
        f"lbnode: {config}: cluster.etcd_ca: {files['etcd_key']} is not a PEM certificate without a passphrase")

    config, _, _ = node_config(tmp_path, ("https://127.0.0.1:2379",), 1, {"etcd_cert": files["etcd_cert"]})
    done = check(config)
    assert done.returncode == 1 and done.stderr == (
        f"lbnode: {config}: cluster.etcd_ca: is required with https:// endpoints (the CA that signed etcd's certificates)\n")


def test_plain_http_etcd_is_allowed_and_warned_about_once(spawn, tmp_path: Path, etcd) -> None:  # type: ignore[no-untyped-def]
    backend = spawn_backend(spawn, "a")
    config, http, _ = node_config(tmp_path, etcd.endpoints, backend, {})
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="n1")
    wait_port(http, JOIN_WITHIN)
    assert httpx.get(f"http://127.0.0.1:{http}/", timeout=5).headers["x-backend"] == "a"
    node.terminate()
    warnings = [line for line in node.log().splitlines() if "etcd over plain http" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], node.log()


def test_cluster_tls_keys_are_validated_naming_the_key() -> None:
    from lbnode.config import ConfigFileError, load_config_text

    head = '[node]\nid = "n1"\n[cluster]\n'
    cases = {
        'etcd = ["https://a:2379", "http://b:2379"]\netcd_ca = "ca.pem"':
            "cluster.etcd: mixes http:// and https:// endpoints: give every endpoint the same scheme",
        'etcd = ["https://a:2379"]\netcd_ca = "ca.pem"\netcd_cert = "c.pem"':
            "cluster.etcd_key: is required: etcd_cert and etcd_key go together (the client certificate and its key)",
        'etcd = ["http://a:2379"]\netcd_ca = "ca.pem"':
            "cluster.etcd_ca: is set but the etcd endpoints are http://: use https:// endpoints",
        'etcd = ["ftp://a:2379"]': "cluster.etcd[0]: 'ftp://a:2379' is not an endpoint like \"http://127.0.0.1:2379\"",
    }
    for body, message in cases.items():
        with pytest.raises(ConfigFileError) as caught:
            load_config_text(head + body + "\n", "n.toml")
        assert str(caught.value) == f"n.toml: {message}"
    config = load_config_text(head + 'etcd = ["https://a:2379"]\netcd_ca = "ca.pem"\n', "n.toml")
    assert config.cluster is not None and config.cluster.etcd_tls and config.cluster.etcd_cert is None


def test_certs_init_issues_etcd_member_and_client_certificates_under_their_own_ca(tmp_path: Path) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    done = subprocess.run(
        [sys.executable, "-m", "lbctl.cli", "certs", "init", "--dir", str(tmp_path), "--nodes", "n1",
         "--etcd-members", "m1=192.0.2.1,m2=192.0.2.2", "--etcd-members", "m1=etcd1.example"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    etcd_dir = tmp_path / "etcd"
    assert {p.name for p in etcd_dir.iterdir()} == {"ca.pem", "ca.key", "m1.pem", "m1.key", "m2.pem", "m2.key",
                                                   "client.pem", "client.key"}
    m1 = x509.load_pem_x509_certificate((etcd_dir / "m1.pem").read_bytes())
    sans = m1.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                        ipaddress.ip_address("192.0.2.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["m1", "localhost", "etcd1.example"]
    usage = m1.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}  # clients and peers
    # etcd's CA is not the control API's: no control-API certificate gets into etcd.
    assert (etcd_dir / "ca.pem").read_bytes() != (tmp_path / "ca.pem").read_bytes()
    client = x509.load_pem_x509_certificate((etcd_dir / "client.pem").read_bytes())
    assert client.issuer == x509.load_pem_x509_certificate((etcd_dir / "ca.pem").read_bytes()).subject
    for mode in ("ca.key", "m1.key", "client.key"):
        assert (etcd_dir / mode).stat().st_mode & 0o777 == 0o600

    # A member added later (etcd certificates only): same CA, and the nodes' client certificate is kept.
    before = {name: (etcd_dir / name).read_bytes() for name in ("ca.pem", "client.pem", "client.key", "m1.pem")}
    done = subprocess.run(
        [sys.executable, "-m", "lbctl.cli", "certs", "init", "--dir", str(tmp_path), "--etcd-members", "m3=192.0.2.3"],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert {name: (etcd_dir / name).read_bytes() for name in before} == before
    m3 = x509.load_pem_x509_certificate((etcd_dir / "m3.pem").read_bytes())
    assert m3.issuer == client.issuer

    done = subprocess.run(
        [sys.executable, "-m", "lbctl.cli", "certs", "init", "--dir", str(tmp_path), "--nodes", "n1",
         "--etcd-members", "m1"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and done.stderr == 'lbctl: --etcd-members: "m1" is not MEMBER=ADDRESS\n'
