"""The fuzz oracle's two readings of one byte stream: ours (framing + check_request) and h11's.

Owns turning both parsers' output into comparable ``Message`` lists and deciding
whether they agree. Pure: no sockets, no clock. h11 is the reference because it is an
independent, strict, sans-I/O implementation of RFC 9112 (nothing shared with llhttp).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import h11

from lbnode.http.framing import End, ParseError, RequestReader, ResponseReader, Upgrade
from lbnode.http.headers import BadRequest, RequestHead, ResponseHead, check_request

Fields = tuple[tuple[bytes, bytes], ...]

_ONE_SP = re.compile(rb" +")
# What h11 and we both strip around a field value (RFC 9110 5.5: OWS is not part of it).
_OWS = b" \t"


@dataclass
class Message:
    """One parsed message, in the form both readings are compared in."""

    start: tuple[bytes, ...]  # (method, target, version) or (status, version) for a response
    headers: Fields
    body: bytes = b""
    trailers: Fields = ()
    interim: bool = False  # a 1xx response other than 101

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


@dataclass
class Reading:
    """What one parser made of a stream: complete messages, then how the stream ended.

    ``end`` is "incomplete" (more bytes needed), "closed" (the connection ends after the
    last message: Connection: close or HTTP/1.0), "upgrade", or "refused".
    """

    messages: list[Message] = field(default_factory=list)
    end: str = "incomplete"
    status: int = 0  # of a refusal
    reason: str = ""
    partial: bool = False  # a message was started and not finished


def _fields(items: list[tuple[bytes, bytes]] | Fields) -> Fields:
    # h11 hands Transfer-Encoding values over lower-case; their case carries no meaning.
    return tuple((n, v.strip(_OWS).lower() if n.lower() == b"transfer-encoding" else v.strip(_OWS))
                 for n, v in items)


def _tokens(values: list[bytes]) -> set[bytes]:
    return {t.strip(_OWS).lower() for v in values for t in v.split(b",") if t.strip(_OWS)}


def is_real_upgrade(msg: Message) -> bool:
    """A request asking to switch protocols (Upgrade named in Connection), as llhttp reads it."""
    return bool(msg.header_values(b"upgrade")) and b"upgrade" in _tokens(msg.header_values(b"connection"))


# ----------------------------------------------------------------------------- requests
def ours_requests(pieces: list[bytes], max_header_bytes: int) -> Reading:
    """Our reading: RequestReader fed ``pieces`` one by one, each head through check_request."""
    reader = RequestReader(max_header_bytes)
    for piece in pieces:
        reader.feed(piece)
    out = Reading()
    current: Message | None = None
    head: RequestHead | None = None
    for ev in reader.events:
        if isinstance(ev, RequestHead):
            head = ev
            target = ev.target  # before check_request rewrites an absolute-form one
            try:
                check_request(ev)
            except BadRequest as exc:
                out.end, out.status, out.reason = "refused", exc.status, exc.reason
                break
            current = Message((ev.method, target, ev.version.encode()), _fields(ev.headers))
        elif isinstance(ev, bytes):
            assert current is not None, "body bytes before a head"
            current.body += ev
        elif isinstance(ev, End):
            assert current is not None and head is not None, "End before a head"
            current.trailers = _fields(ev.trailers)
            out.messages.append(current)
            current = None
            if not head.keep_alive:
                out.end = "closed"
                break
        elif isinstance(ev, Upgrade):
            out.end = "upgrade"
            break
        elif isinstance(ev, ParseError):
            out.end, out.status, out.reason = "refused", ev.status, ev.reason
            break
    out.partial = current is not None
    reader.close()
    return out


def reference_requests(data: bytes, max_header_bytes: int) -> Reading:
    """h11's reading, one request per fresh h11 connection so pipelining goes on.

    Two leniencies of llhttp that RFC 9112 allows are applied to h11's input first, since
    the request line is rebuilt by us and cannot carry them on: CR and LF bytes before a
    request line are skipped (2.2), and runs of SP in it read as one (3)."""
    out = Reading()
    rest = data
    while True:
        rest = rest.lstrip(b"\r\n")
        eol = rest.find(b"\n")
        if eol > 0:
            rest = _ONE_SP.sub(b" ", rest[:eol]) + rest[eol:]
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        if rest:  # h11 reads b"" as the end of the stream
            conn.receive_data(rest)
        if not _reference_one_request(conn, out):
            return out
        rest = conn.trailing_data[0]


def _reference_one_request(conn: h11.Connection, out: Reading) -> bool:
    """Read one request; True if the connection goes on after it.

    h11 closes after every HTTP/1.0 request, while llhttp (and RFC 9112 appendix C.2.2)
    keep a 1.0 connection open when it says ``Connection: keep-alive``."""
    current: Message | None = None
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as exc:
            out.end, out.status, out.reason = "refused", exc.error_status_hint, str(exc)[:200]
            out.partial = current is not None
            return False
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            out.partial = current is not None
            return False
        if isinstance(ev, h11.Request):
            current = Message((ev.method, ev.target, ev.http_version), _fields(ev.headers.raw_items()))
        elif isinstance(ev, h11.Data):
            assert current is not None
            current.body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            assert current is not None
            current.trailers = _fields(ev.headers.raw_items())
            out.messages.append(current)
            if is_real_upgrade(current) or current.start[0] == b"CONNECT":
                out.end = "upgrade"
                return False
            tokens = _tokens(current.header_values(b"connection"))
            if current.start[2] == b"1.0":
                keep = b"keep-alive" in tokens and b"close" not in tokens
            else:
                keep = b"close" not in tokens
            if not keep:
                out.end = "closed"
            return keep
        else:  # ConnectionClosed cannot come: no EOF is fed
            raise AssertionError(f"unexpected h11 event {ev!r}")


# ----------------------------------------------------------------------------- responses
def ours_response(pieces: list[bytes], request_method: bytes) -> Reading:
    """Our reading of one backend response (1xx interim responses included).

    The request asked for no upgrade, so a 101 is refused as the proxy refuses it (502)."""
    reader = ResponseReader(request_method)
    for piece in pieces:
        reader.feed(piece)
    out = Reading()
    current: Message | None = None
    for ev in reader.events:
        if isinstance(ev, ResponseHead):
            current = Message(
                (b"%d" % ev.status, ev.version.encode()), _fields(ev.headers), interim=100 <= ev.status < 200
            )
            if ev.status == 101:
                current = None
                out.end, out.status, out.reason = "refused", 502, "101 without an upgrade request"
                break
        elif isinstance(ev, bytes):
            assert current is not None, "body bytes before a head"
            current.body += ev
        elif isinstance(ev, End):
            assert current is not None, "End before a head"
            current.trailers = _fields(ev.trailers)
            out.messages.append(current)
            final = not current.interim
            current = None
            if final:
                out.end = "closed"
                break
        elif isinstance(ev, Upgrade):
            out.end = "upgrade"
            break
        elif isinstance(ev, ParseError):
            out.end, out.status, out.reason = "refused", ev.status, ev.reason
            break
    # A close-delimited body is cut off by EOF, which these readings never see: what came
    # so far is compared as a partial message.
    if current is not None and out.end == "incomplete":
        out.partial = True
        out.messages.append(current)
    reader.close()
    return out


def reference_response(data: bytes, request_method: bytes) -> Reading:
    """h11's reading, as the client that sent ``request_method /``.

    A status line h11 refuses only for a control byte in its reason phrase is read with
    those bytes removed: we replace such a phrase (it means nothing to a client)."""
    for _ in range(4):  # an interim response or two, then the final one
        out = _reference_response(data, request_method)
        if out.end != "refused" or not out.reason.startswith("illegal status line"):
            return out
        for m in _STATUS_LINE.finditer(data):
            if _CONTROL_BYTE.search(m.group(2)):
                data = data[: m.start(2)] + _CONTROL_BYTE.sub(b"", m.group(2)) + data[m.end(2) :]
                break
        else:
            return out
    return out


_STATUS_LINE = re.compile(rb"(?m)^(HTTP/\d\.\d \d{3} )([^\r\n]*)")
_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _reference_response(data: bytes, request_method: bytes) -> Reading:
    data = data.lstrip(b"\r\n")  # llhttp skips empty lines before a status line too
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=request_method, target=b"/", headers=[(b"host", b"backend")]))
    conn.send(h11.EndOfMessage())
    if data:  # h11 reads b"" as the end of the stream
        conn.receive_data(data)
    out = Reading()
    current: Message | None = None
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as exc:
            out.end, out.status, out.reason = "refused", 502, str(exc)
            break
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            break
        if isinstance(ev, h11.InformationalResponse):
            msg = Message((b"%d" % ev.status_code, ev.http_version), _fields(ev.headers.raw_items()), interim=True)
            out.messages.append(msg)
            if ev.status_code == 101:
                out.end = "upgrade"
                break
        elif isinstance(ev, h11.Response):
            current = Message((b"%d" % ev.status_code, ev.http_version), _fields(ev.headers.raw_items()))
        elif isinstance(ev, h11.Data):
            assert current is not None
            current.body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            assert current is not None
            current.trailers = _fields(ev.headers.raw_items())
            out.messages.append(current)
            current = None
            out.end = "closed"
            break
        else:
            raise AssertionError(f"unexpected h11 event {ev!r}")
    if current is not None and out.end == "incomplete":
        out.partial = True
        out.messages.append(current)
    return out


# ----------------------------------------------------------------------------- verdicts
# Findings another branch fixes (coldstart): the oracle names them instead of failing on them.
KNOWN_VERSION = "known (coldstart branch): a version other than 1.0/1.1 must get 505"
KNOWN_ABSOLUTE_FORM = "known (coldstart branch): absolute-form target must set Host to its authority"


def known_request_issue(msg: Message) -> str | None:
    """The known finding a message our side accepted runs into, if any."""
    if msg.start[2] not in (b"1.0", b"1.1"):
        return KNOWN_VERSION
    return None


@dataclass
class Verdict:
    """``kind``: agree | stricter (we refused what h11 takes) | known | mismatch."""

    kind: str
    detail: str = ""


def _show(msg: Message) -> str:
    text = f"{msg.start!r} headers={msg.headers!r} body={msg.body[:80]!r} trailers={msg.trailers!r}"
    return text if len(text) < 600 else text[:600] + "..."


def compare(ours: Reading, ref: Reading, known: object = known_request_issue) -> Verdict:
    """Do the two readings agree, up to a clean refusal on our side?

    Our side may refuse at any point (a 4xx before the backend sees the message); what
    it may never do is complete a message h11 does not (the start of request smuggling),
    or complete one that differs from h11's."""
    n = min(len(ours.messages), len(ref.messages))
    for i in range(n):
        a, b = ours.messages[i], ref.messages[i]
        if (a.start, a.headers, a.body, a.trailers) != (b.start, b.headers, b.body, b.trailers):
            return Verdict("mismatch", f"message {i} differs:\n ours {_show(a)}\n h11  {_show(b)}")
    for msg in ours.messages:
        issue = known(msg)  # type: ignore[operator]
        if issue:
            return Verdict("known", issue)
    if len(ours.messages) > n:
        extra = ours.messages[n]
        if extra.interim or (ours.partial and ours.messages[-1] is extra and ref.partial):
            pass  # a close-delimited response body both cut at the same place is compared above
        else:
            return Verdict("mismatch", f"we complete message {n} that h11 reads as {ref.end}"
                           f" ({ref.reason}):\n ours {_show(extra)}")
    if len(ref.messages) > n:
        if ours.end == "refused":
            return Verdict("stricter", f"we refuse ({ours.status} {ours.reason}) message {n} h11 takes")
        return Verdict("mismatch", f"h11 completes message {n} that we read as {ours.end}:\n"
                       f" h11 {_show(ref.messages[n])}")
    if ours.end == "refused":
        return Verdict("agree" if ref.end == "refused" else "stricter", ours.reason)
    if ref.end == "refused":
        if ours.end == "incomplete":
            return Verdict("agree", "we still wait where h11 refuses: nothing was completed")
        return Verdict("mismatch", f"h11 refuses ({ref.reason}) where we read {ours.end}")
    if ours.end != ref.end:
        return Verdict("mismatch", f"the stream ends {ours.end!r} for us and {ref.end!r} for h11")
    return Verdict("agree")
