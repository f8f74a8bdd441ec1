"""bench/tls.py's pure parts: the configs it gives lbnode and HAProxy."""

from __future__ import annotations

from pathlib import Path

from bench.tls import _certificate, fulcrum_tls_config, haproxy_tls_config
from lbnode.config import load_config_text


def test_configs(tmp_path: Path) -> None:
    cert, key, pem = _certificate(tmp_path)
    config = load_config_text(fulcrum_tls_config([9001, 9002], 8443, 8444, cert, key))
    assert config.listeners[0].protocol == "https"
    assert config.certificates[0].key_type == "ECDSA P-256"
    assert (pem.stat().st_mode & 0o777) == 0o600
    text = haproxy_tls_config([9001, 9002], 8443, pem)
    assert f"bind 127.0.0.1:8443 ssl crt {pem} alpn http/1.1" in text and "nbthread 1" in text
