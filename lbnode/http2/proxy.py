"""An L7 listener that speaks HTTP/2 as well as HTTP/1.1 to its clients.

Owns the choice of protocol per connection: ALPN on https listeners (h2 first, http/1.1
kept), the prior-knowledge preface on http listeners with ``[listeners.http2]`` (h2c).
Every HTTP/2 stream is served by the same per-request code as an HTTP/1.1 request
(``HttpProxy.serve_one``, through the public methods only); this class adds only what differs:
the choice of protocol (``handle``) and GOAWAY on drain (``drain``). The node's own answers to a
gRPC call become a gRPC status in the stream (``StreamConn.answered_locally``), and requests to
``protocol = "h2"`` pools go through ``H2Transport``, which any ``HttpProxy`` takes.
"""

from __future__ import annotations

import socket as stdsocket
from typing import Any

import trio

from lbnode.http.proxy import HttpProxy
from lbnode.http2.protocol import PREFACE
from lbnode.http2.session import H2Session

# How long an h2c listener waits for the rest of a connection preface that came in pieces.
PREFACE_PIECE_WAIT = 0.005


class Http2Proxy(HttpProxy):
    """``HttpProxy`` for a listener whose ``http2`` settings are on (HTTP/2 clients)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h2_connections = 0  # connections that spoke HTTP/2
        self.h2_streams = 0  # requests received on them
        self.h2_limits: dict[str, int] = {}  # connections closed by a limit (or protocol error), by kind
        self._sessions: set[H2Session] = set()

    async def handle(self, sock: stdsocket.socket, client_ip: str, tls_headers: bytes | None = None) -> None:
        if tls_headers is not None:
            if self.listener.http2 is not None and sock.selected_alpn_protocol() == "h2":  # type: ignore[attr-defined]
                await self._serve_h2(sock, client_ip, self.forwarded_port + tls_headers, True)
                return
        elif self.listener.http2 is not None and await self._prior_knowledge(sock):
            await self._serve_h2(sock, client_ip, self.forwarded_port, False)
            return
        await super().handle(sock, client_ip, tls_headers)

    async def _prior_knowledge(self, sock: stdsocket.socket) -> bool:
        """Whether a plain connection starts with the HTTP/2 preface (left unread either way).

        Only the first bytes are looked at (MSG_PEEK): an HTTP/1.1 request goes on to the
        HTTP/1.1 path whole. A preface cut in pieces is waited for up to the header timeout."""
        deadline = trio.current_time() + self.listener.timeouts.header
        with trio.move_on_at(deadline):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(len(PREFACE), stdsocket.MSG_PEEK)
                except BlockingIOError:
                    continue
                except OSError:
                    return False
                if not data or not PREFACE.startswith(data):
                    return False
                if len(data) == len(PREFACE):
                    return True
                await trio.sleep(PREFACE_PIECE_WAIT)
        return False

    async def _serve_h2(self, sock: stdsocket.socket, client_ip: str, forwarded: bytes, tls: bool) -> None:
        # TCP_NODELAY: the listener's, inherited (lbnode.listen.nodelay_inherited).
        session = H2Session(self, sock, client_ip, forwarded, tls)
        self._sessions.add(session)
        if self.node.draining:
            session.goaway()
        try:
            await session.run()
        finally:
            self._sessions.discard(session)

    def drain(self) -> None:
        super().drain()
        for session in list(self._sessions):
            session.goaway()
