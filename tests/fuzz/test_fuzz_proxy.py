"""Fuzz the proxy end to end: raw-socket client -> real lbnode -> a backend that records all it gets.

Oracle: every request the backend receives is exactly one the client meant (h11's
reading of the client's bytes, with hop-by-hop fields removed and the forwarded ones
added), in order, and none beyond them (request smuggling); a request the node does
not forward gets a 4xx/5xx from the node itself and reaches the backend not at all.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter

import h11
import trio
from hypothesis import given

from tests.conftest import listener_toml, node_toml, pool_toml, start_node
from tests.fuzz import budget
from tests.fuzz.reference import (
    KNOWN_VERSION,
    Message,
    _fields,
    _tokens,
    is_real_upgrade,
    reference_requests,
)
from tests.fuzz.strategies import request_stream

MAX_HEADER_BYTES = 64 * 1024  # the listener default
CLIENT_IP = "127.0.0.1"
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"}
FORWARDED = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"via"}
# Fields Connection may not remove (RFC 9110 7.6.1 lets a proxy refuse: they frame or route).
NEVER_DROPPED = {b"content-length", b"host", b"transfer-encoding"}
# Whole exchange bound: the node answers at once (the client half-closes after sending,
# so nothing waits on a timeout); 10 s is for a loaded 2-core machine.
EXCHANGE_TIMEOUT = 10.0


class Rig:
    """A real node and a recording backend, in a Trio run on their own thread."""

    def __init__(self) -> None:
        self.received: list[Message] = []
        self.backend_errors: list[str] = []
        self.cut = 0  # requests the node began to stream, then closed the connection on
        self.open_requests = 0  # backend connections in the middle of a request
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the fuzz node did not start within 30 s")

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._token = trio.lowlevel.current_trio_token()
            self._scope = nursery.cancel_scope
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            backend_port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, self._backend, listeners)
            toml = node_toml(
                listener_toml("web", "http", "web", extra="[listeners.timeouts]\nheader = \"5s\"\nbody = \"5s\"\n"),
                pool_toml("web", [f"127.0.0.1:{backend_port}"], retries=0),
            )
            _, bound = await start_node(nursery, toml)
            self.port = bound.listeners["web"][1]
            self._ready.set()

    def stop(self) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(30)

    async def _backend(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        current: Message | None = None
        data = b"-"  # the last read; b"" once the node closed
        try:
            while True:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA or ev is h11.PAUSED:
                        break
                    if isinstance(ev, h11.ConnectionClosed):
                        return
                    if isinstance(ev, h11.Request):
                        current = Message((ev.method, ev.target, ev.http_version), _fields(ev.headers.raw_items()))
                        self.open_requests += 1
                    elif isinstance(ev, h11.Data):
                        current.body += ev.data  # type: ignore[union-attr]
                    elif isinstance(ev, h11.EndOfMessage):
                        current.trailers = _fields(ev.headers.raw_items())  # type: ignore[union-attr]
                        self.received.append(current)  # type: ignore[arg-type]
                        self.open_requests -= 1
                        current = None
                        seq = b"%d" % len(self.received)
                        out = conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0"), (b"x-seq", seq)]))
                        out += conn.send(h11.EndOfMessage())  # type: ignore[operator]
                        await stream.send_all(out)  # type: ignore[arg-type]
                        if conn.our_state is h11.MUST_CLOSE:
                            return
                        conn.start_next_cycle()
                if not data:
                    return
        except h11.RemoteProtocolError as exc:
            if current is not None and conn.their_state is h11.ERROR and not data:
                self.cut += 1  # EOF mid-request: judged against what the client got
            else:
                self.backend_errors.append(f"the backend could not parse what the node sent: {exc}")
        except trio.BrokenResourceError:
            pass
        finally:
            if current is not None:
                self.open_requests -= 1
            await stream.aclose()


def exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data``, half-close, read to the end: (what came back, whether it was reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=EXCHANGE_TIMEOUT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the node refused early and closed: what it said is still read below
        chunks = []
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    return b"".join(chunks), False
                chunks.append(piece)
        except ConnectionResetError:
            return b"".join(chunks), True


def split_responses(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The responses in ``raw``: (status, lower-case fields, body).

    The backend's carry X-Seq and no body; one of the node's own ends the connection, so
    its body is the rest (a HEAD's has none, whatever its Content-Length says)."""
    out = []
    rest = raw
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"a response head cut short: {head[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        size = int(fields.get(b"content-length", 0)) if b"x-seq" in fields else len(rest)
        out.append((status, fields, rest[:size]))
        rest = rest[size:]
    return out


def expected_upstream(msg: Message, port: int) -> tuple[Message, dict[bytes, bytes], str | None]:
    """What the backend must receive for ``msg``: its end-to-end part, the forwarded fields,
    and the known finding it runs into, if any."""
    method, target, version = msg.start
    known = None
    if version not in (b"1.0", b"1.1"):
        known = KNOWN_VERSION
    hosts = msg.header_values(b"host")
    authority = None
    if target.lower().startswith((b"http://", b"https://")):
        # RFC 9112 3.2.2: the target's authority is the Host, sent in the Host field's place
        rest = target.split(b"://", 1)[1]
        end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority, tail = rest[:end], rest[end:]
        target = tail if tail.startswith(b"/") else b"/" + tail
    tokens = _tokens(msg.header_values(b"connection"))
    drop = HOP_BY_HOP | FORWARDED | (tokens - NEVER_DROPPED)
    kept = tuple((n, v) for n, v in msg.headers if n.lower() not in drop)
    if authority is not None:
        replaced: list[tuple[bytes, bytes]] = []
        placed = False
        for n, v in kept:
            if n.lower() == b"host":
                if not placed:
                    replaced.append((b"Host", authority))
                placed = True
                continue
            replaced.append((n, v))
        if not placed:
            replaced.append((b"Host", authority))
        kept = tuple(replaced)
        hosts = [authority]
    elif not hosts:
        # HTTP/1.1 needs one: the authority the client reached (the node's listener)
        kept += ((b"Host", b"127.0.0.1:%d" % port),)
    forwarded = {
        b"x-forwarded-for": b", ".join([*msg.header_values(b"x-forwarded-for"), CLIENT_IP.encode()]),
        b"x-forwarded-proto": b"http",
        b"x-forwarded-port": str(port).encode(),  # the listener's port; a client's copy is dropped
        b"via": b", ".join([*msg.header_values(b"via"), version + b" fulcrum"]),
    }
    if hosts and hosts[0]:  # an empty Host says nothing worth forwarding
        forwarded[b"x-forwarded-host"] = hosts[0]
    if msg.header_values(b"transfer-encoding"):
        forwarded[b"transfer-encoding"] = b"chunked"
    if is_real_upgrade(msg):
        forwarded[b"connection"] = b"Upgrade"
        forwarded[b"upgrade"] = msg.header_values(b"upgrade")[0]
    return Message((method, target, b"1.1"), kept, msg.body, msg.trailers), forwarded, known


def _list_value(name: bytes, value: bytes) -> object:
    """X-Forwarded-For and Via are lists (RFC 9110 5.6.1): OWS around commas and empty
    elements carry no meaning, so "a , b" and "a, b" are the same value."""
    if name in (b"x-forwarded-for", b"via"):
        return tuple(e.strip(b" \t") for e in value.split(b",") if e.strip(b" \t"))
    return value


def check_upstream(got: Message, msg: Message, port: int) -> str | None:
    """None if the backend got exactly what ``msg`` means, else what differs; known findings named."""
    want, forwarded, known = expected_upstream(msg, port)
    seen = [(n.lower(), v) for n, v in got.headers if n.lower() in HOP_BY_HOP | FORWARDED]
    seen_forwarded = {n: _list_value(n, v) for n, v in seen}
    forwarded = {n: _list_value(n, v) for n, v in forwarded.items()}
    end_to_end = tuple((n, v) for n, v in got.headers if n.lower() not in HOP_BY_HOP | FORWARDED)
    problems = []
    if got.start != want.start:
        problems.append(f"request line {got.start!r}, meant {want.start!r}")
    if end_to_end != want.headers:
        problems.append(f"fields {end_to_end!r}, meant {want.headers!r}")
    if len(seen) != len(seen_forwarded):
        problems.append(f"a forwarded field twice: {seen!r}")
    if seen_forwarded != forwarded:
        problems.append(f"forwarded fields {seen_forwarded!r}, meant {forwarded!r}")
    if got.body != want.body or got.trailers != want.trailers:
        problems.append(f"body {got.body[:80]!r} {got.trailers!r}, meant {want.body[:80]!r} {want.trailers!r}")
    if not problems:
        return None
    return known or "; ".join(problems)


def check_exchange(rig: Rig, data: bytes, tally: Counter[str]) -> None:
    rig.received.clear()
    rig.backend_errors.clear()
    rig.cut = 0
    raw, reset = exchange(rig.port, data)
    # The node relays a response only after the backend sent it, so the backend has
    # recorded every request it answered; give a request it has not finished a moment.
    deadline = time.monotonic() + 1.0
    while rig.open_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not rig.backend_errors, rig.backend_errors
    meant = reference_requests(data, MAX_HEADER_BYTES).messages
    got = list(rig.received)
    # (llhttp reads a request line without a version as HTTP/0.9 and still reads the lines
    # after it as fields, where h11 refuses it: the node answers 505 to any version but 1.0
    # and 1.1 now, so such a request reaching the backend is a failure like any other.)
    assert len(got) <= len(meant), (
        f"SMUGGLING: the backend got {len(got)} requests, the client meant {len(meant)}:\n"
        f" got {[m.start for m in got]}\n meant {[m.start for m in meant]}"
    )
    for i, request in enumerate(got):
        problem = check_upstream(request, meant[i], rig.port)
        assert problem is None, f"request {i} reached the backend altered: {problem}"
    assert rig.open_requests == 0, "a request the node started sending was left half-sent at the backend"
    responses = split_responses(raw)
    from_backend = [r for r in responses if b"x-seq" in r[1]]
    if reset:
        # The node closed with client bytes unread (after a refusal), so the kernel reset
        # the connection; Linux still delivers what was sent before, checked below.
        tally["note: reset after the node's last response"] += 1
    assert len(from_backend) == len(got), f"{len(got)} forwarded, {len(from_backend)} backend responses relayed"
    for status, fields, _ in responses[len(from_backend):]:
        assert 400 <= status < 600 and b"x-seq" not in fields, f"the node answered {status} by itself"
        assert responses[-1][0] == status, "a response of the node's own that is not its last"
    if rig.cut:
        # A streamed body the node found malformed half-way: the backend saw the start of
        # that request and then the connection close, never a complete request.
        assert rig.cut == 1 and responses and b"x-seq" not in responses[-1][1], (
            f"{rig.cut} request(s) cut at the backend without the node refusing one"
        )
        tally["note: streamed, then refused and cut at the backend"] += 1
    tally["forwarded all" if len(got) == len(meant) else "refused"] += 1
    if len(got) < len(meant):
        tally[f"note: refused h11-valid: {responses[len(got)][2][:60].decode('latin-1').strip()}"
              if len(responses) > len(got) else "note: closed without answer"] += 1


def test_the_backend_gets_what_the_client_meant_or_nothing() -> None:
    logging.getLogger("lbnode").setLevel(logging.ERROR)  # a refusal per example is logged otherwise
    rig = Rig()
    tally: Counter[str] = Counter()
    try:
        def build(s):  # type: ignore[no-untyped-def]
            @s
            @given(data=request_stream())
            def check(data: bytes) -> None:
                check_exchange(rig, data, tally)

            return check

        budget.run("proxy", build, 100, tally)
    finally:
        rig.stop()
        logging.getLogger("lbnode").setLevel(logging.NOTSET)
