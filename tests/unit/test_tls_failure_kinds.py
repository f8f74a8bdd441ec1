"""How a failed handshake is counted (lbnode.tls.terminate._kind): the same client gets the
same kind whatever the interpreter's ssl module raises for it."""

from __future__ import annotations

import ssl

from lbnode.tls.terminate import _kind


def test_a_client_that_closes_mid_handshake_is_eof_on_either_python() -> None:
    # 3.11.7 raises SSLEOFError; Debian's 3.11.2 SSLZeroReturnError for the same close.
    assert _kind(ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:992)")) == "eof"
    assert _kind(ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF) (_ssl.c:992)")) == "eof"
    assert _kind(ssl.SSLError(1, "[SSL] something else")) == "protocol"
