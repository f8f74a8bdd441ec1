"""An independent scanner (sslscan, a Debian package) against an https listener with default
settings: nothing weaker than Mozilla's "intermediate" profile."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import trio

from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.tlsgen import make_ca, make_leaf

INTERMEDIATE_TLS12 = {
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
}
INTERMEDIATE_TLS13 = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
# The profile's groups plus stronger ones OpenSSL offers by default; ffdhe2048 (112 bits) is
# the profile's own DHE size.
ACCEPTABLE_GROUPS = {"x25519", "secp256r1 (NIST P-256)", "secp384r1 (NIST P-384)", "secp521r1 (NIST P-521)",
                     "x448", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192"}


async def test_sslscan_finds_nothing_weaker_than_intermediate(nursery, tmp_path: Path) -> None:
    if shutil.which("sslscan") is None:
        pytest.fail("sslscan is missing: `make sysdeps-test` installs it")
    ca = make_ca()
    ec = make_leaf(ca, ["www.example.com"]).write(tmp_path, "ec")
    rsa = make_leaf(ca, ["www.example.com"], kind="rsa").write(tmp_path, "rsa")
    backends = await start_backends(nursery, "a")
    _, bound = await start_node(nursery, node_toml(
        pool_toml("web", [backends[0].address]),
        f'[[certificates]]\nname = "ec"\ncert = "{ec[0]}"\nkey = "{ec[1]}"\n'
        f'[[certificates]]\nname = "rsa"\ncert = "{rsa[0]}"\nkey = "{rsa[1]}"\n',
        listener_toml("web", "https", "web", extra='  [listeners.tls]\n  certificates = ["ec", "rsa"]\n'),
    ))
    port = bound.listeners["web"][1]
    proc = await trio.to_thread.run_sync(lambda: subprocess.run(
        ["sslscan", "--no-colour", "--xml=-", "--sni-name=www.example.com", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120))
    doc = ET.fromstring(proc.stdout[proc.stdout.index("<?xml"):].split("\n", 1)[1])
    test = doc.find("ssltest")
    assert test is not None, proc.stdout
    enabled = {p.get("version") for p in test.iter("protocol") if p.get("enabled") == "1"}
    assert enabled == {"1.2", "1.3"}
    ciphers = {(c.get("sslversion"), c.get("cipher")) for c in test.iter("cipher")}
    assert {c for v, c in ciphers if v == "TLSv1.2"} == INTERMEDIATE_TLS12
    assert {c for v, c in ciphers if v == "TLSv1.3"} == INTERMEDIATE_TLS13
    assert {c.get("strength") for c in test.iter("cipher")} <= {"strong", "acceptable"}
    groups = {g.get("name") for g in test.iter("group")}
    assert groups <= ACCEPTABLE_GROUPS and "x25519" in groups
    reneg = test.find("renegotiation")
    assert reneg is not None and reneg.get("supported") == "0"
    assert all(h.get("vulnerable") == "0" for h in test.iter("heartbleed"))
