"""[[certificates]] and [listeners.tls] in node.toml: real files, real certificates, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lbnode.config import ConfigFileError, load_config_text
from lbnode.runtime import Snapshot
from tests.tlsgen import make_ca, make_leaf

BASE = """\
[node]
id = "n1"

[[pools]]
name = "web"
  [[pools.backends]]
  address = "127.0.0.1:9001"

[[certificates]]
name = "www"
cert = "{crt}"
key = "{key}"

[[certificates]]
name = "wild"
cert = "{wcrt}"
key = "{wkey}"

[[listeners]]
name = "secure"
protocol = "https"
bind = "127.0.0.1:0"
pool = "web"
  [listeners.tls]
  certificates = ["www", "wild"]
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("certs")
    ca = make_ca()
    crt, key = make_leaf(ca, ["www.example.com"]).write(d, "www")
    wcrt, wkey = make_leaf(ca, ["*.example.com"], kind="rsa").write(d, "wild")
    other = make_leaf(ca, ["www.example.com"])
    (d / "garbage.pem").write_bytes(b"not a pem at all\n")
    (d / "other.key").write_bytes(other.key_pem)
    return {"crt": crt, "key": key, "wcrt": wcrt, "wkey": wkey, "dir": d}


def _toml(files: dict[str, Path], **replace: str) -> str:
    text = BASE.format(**{k: str(v) for k, v in files.items() if k != "dir"})
    for old, new in replace.items():
        assert old in text or old.startswith("+"), old
        text = text + new if old.startswith("+") else text.replace(old, new)
    return text


def test_certificates_reach_the_snapshot(files) -> None:
    config = load_config_text(_toml(files))
    assert [c.name for c in config.certificates] == ["www", "wild"]
    li = config.listeners[0]
    assert li.protocol == "https" and li.tls is not None
    assert li.tls.certificates == ("www", "wild") and li.tls.min_version == "1.2"
    snap = Snapshot.build(config)
    assert set(snap.certificates) == {"www", "wild"}
    table = snap.sni["secure"]
    assert table is not None
    assert table.choose("api.example.com").name == "wild"
    assert table.choose("nothing.test").name == "www"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"{key}": "{dir}/missing.key"}, r"certificates\[0\]\.key: .*/missing\.key: no such file"),
        ({"{key}": "{dir}/other.key"}, r"certificates\[0\]\.key: .*/other\.key: does not match the certificate's public key"),
        ({"{crt}": "{dir}/garbage.pem"}, r"certificates\[0\]\.cert: .*/garbage\.pem: no PEM certificate found"),
        ({'certificates = ["www", "wild"]': 'certificates = ["www", "nope"]'},
         r'listeners\[0\]\.tls\.certificates\[1\]: certificate "nope" is not defined in \[\[certificates\]\]'),
        ({'certificates = ["www", "wild"]': "certificates = []"}, r"listeners\[0\]\.tls\.certificates: expected a non-empty list"),
        ({"  [listeners.tls]\n  certificates = [\"www\", \"wild\"]\n": ""}, r'listeners\[0\]\.tls: is required for protocol = "https"'),
        ({'protocol = "https"': 'protocol = "http"'}, r'listeners\[0\]\.tls: needs protocol = "https" or "tls"'),
        ({"+": '  min_version = "1.1"\n'}, r'listeners\[0\]\.tls\.min_version: "1.1" is not one of: 1.2, 1.3'),
        ({"+": '  client_auth = "required"\n'}, r"listeners\[0\]\.tls\.client_ca: is required with client_auth"),
        ({"+": '  hsts = "forever"\n'}, r'listeners\[0\]\.tls\.hsts: "forever" is not like'),
        ({"+": '  handshake_timeout = "soon"\n'}, r"listeners\[0\]\.tls\.handshake_timeout: \"soon\" is not a duration"),
        ({"+": "  bogus = 1\n"}, r"listeners\[0\]\.tls\.bogus: unknown key"),
        ({"+": '  ciphers = "NOTHING-AT-ALL"\n'}, r'listeners\[0\]\.tls\.ciphers: "NOTHING-AT-ALL" selects no cipher'),
        ({"+": '  client_auth = "optional"\n  client_ca = "{dir}/nope.pem"\n'}, r"listeners\[0\]\.tls\.client_ca: .*/nope\.pem: no such file"),
        ({"+": '  client_auth = "optional"\n  client_ca = "{dir}/garbage.pem"\n'}, r"listeners\[0\]\.tls\.client_ca: .*/garbage\.pem: not a PEM CA bundle"),
        ({'name = "wild"': 'name = "www"'}, r'certificates\[1\]\.name: "www" is already used by certificates\[0\]'),
    ],
)
def test_config_errors_name_the_key(files, change, message) -> None:
    replace = {k: v.format(dir=files["dir"]) if "{dir}" in v else v for k, v in change.items()}
    text = BASE
    for old, new in replace.items():
        text = text + new if old == "+" else text.replace(old, new)
    text = text.format(**{k: str(v) for k, v in files.items() if k != "dir"})
    with pytest.raises(ConfigFileError, match=message) as info:
        load_config_text(text, "node.toml")
    assert "\n" not in str(info.value)


def test_redirect_https(files) -> None:
    plain = 'name = "plain"\nprotocol = "http"\nbind = "127.0.0.1:0"\npool = "web"\n'
    config = load_config_text(_toml(files, **{"+": f"[[listeners]]\n{plain}redirect_https = true\n"}))
    assert config.listeners[1].redirect_https == 443
    config = load_config_text(_toml(files, **{"+": f"[[listeners]]\n{plain}redirect_https = 8443\n"}))
    assert config.listeners[1].redirect_https == 8443
    with pytest.raises(ConfigFileError, match=r'listeners\[0\]\.redirect_https: is for protocol = "http"'):
        load_config_text(_toml(files, **{'pool = "web"\n  [listeners.tls]': 'pool = "web"\nredirect_https = true\n  [listeners.tls]'}))


def test_lbnode_check_exits_1_with_one_line(files, tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(BASE.format(**{k: str(v) for k, v in files.items() if k != "dir"}).replace(
        str(files["key"]), str(files["dir"] / "other.key")))
    proc = subprocess.run([sys.executable, "-m", "lbnode.cli", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "certificates[0].key:" in lines[0] and "does not match" in lines[0]
    assert "PRIVATE KEY" not in proc.stderr
