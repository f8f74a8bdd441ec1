"""``StreamConn`` stands in for a client connection: it must carry every ``ClientConn`` field
the proxy reads, though it sets them itself (``ClientConn.__init__`` builds what a stream
never uses)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from lbnode.http.proxy import ClientConn
from lbnode.http2.session import StreamConn


async def test_a_stream_sets_every_field_of_a_client_connection() -> None:
    with socket.socket() as sock:
        session = SimpleNamespace(sock=sock, io=[0, 0], ip="127.0.0.1", forwarded=b"", pick_context=object(),
                                  deadlines=object(), trickle_waits=object(), port=0, tls_version=None, sni=None)
        conn = StreamConn(session, 1, b"GET", False)  # type: ignore[arg-type]
        fields = {name for cls in ClientConn.__mro__ for name in getattr(cls, "__slots__", ())}
        assert fields, "ClientConn declares its fields in __slots__"
        unset = sorted(name for name in fields if not hasattr(conn, name))
        assert unset == [], f"ClientConn fields a StreamConn leaves unset: {unset}"
        # The same defaults as a fresh client connection, where the stream has no reason to differ.
        fresh = ClientConn(sock, "127.0.0.1", 1024)
        for name in ("wait_readable", "eof", "served", "idle_wait", "private_upstreams", "received", "sent", "entry", "mark_time",
                     "mark_in", "mark_out", "request_id", "request_id_line", "request_id_drop", "route_pool",
                     "route_cookie", "route"):
            assert getattr(conn, name) == getattr(fresh, name), name
