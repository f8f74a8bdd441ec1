"""HTTP/1.1 framing: bytes in, events out, with httptools (llhttp) doing the parsing.

httptools calls back synchronously while it parses; these collectors turn the
callbacks into a queue of events (a head, body ``bytes``, ``End``, ``Upgrade``,
``ParseError``) that the proxy loop consumes in order, like h11's
``next_event``. Pure: no sockets, no clock.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import httptools

from lbnode.http.headers import (
    REQUEST_NOTED,
    RESPONSE_NOT_FORWARDED,
    Headers,
    RequestHead,
    ResponseHead,
)


@dataclass(slots=True)
class End:
    """The message is complete; ``trailers`` are the chunked trailer fields, if any."""

    trailers: Headers


# llhttp's error for a well-formed ``HTTP/d.d`` it does not know (1.2, 3.0): 505 like the
# versions it parses but we do not speak (2.0, 0.9, refused by check_request), not a 400.
LLHTTP_UNKNOWN_VERSION = "Invalid HTTP version"

# The End of a message without trailers, shared (nothing mutates an End's trailers).
END = End([])


@dataclass(slots=True)
class Upgrade:
    """The peer switched protocols; ``rest`` are the bytes that followed the head."""

    rest: bytes


@dataclass(slots=True)
class ParseError:
    reason: str
    status: int = 400


Event = RequestHead | ResponseHead | bytes | End | Upgrade | ParseError


class RequestReader:
    """Parses a client's byte stream into request events (pipelining included)."""

    def __init__(self, max_header_bytes: int) -> None:
        self.events: deque[Event] = deque()
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._max_header_bytes = max_header_bytes
        self._in_head = True  # between messages or inside a head
        self._head_bytes = 0
        self._head_size = 0  # request line + "name: value\r\n" per field, as parsed
        self._url = b""
        self._headers: Headers = []
        self._noted: Headers = []
        self._forward: list[bytes] = []
        self._trailers: Headers | None = None  # made when a trailer field arrives
        self.broken = False  # after a parse error or upgrade nothing more is parsed

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        if self._in_head:
            self._head_bytes += len(data)
        assert self._parser is not None, "feed after close"
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.broken = True
            self.events.append(Upgrade(data[exc.args[0] :]))
            return
        except httptools.HttpParserError as exc:
            self.broken = True
            if isinstance(exc.__context__, _HeadTooLarge):
                self.events.append(ParseError("request header section too large", 431))
            elif str(exc) == LLHTTP_UNKNOWN_VERSION:
                self.events.append(ParseError("HTTP version not supported (HTTP/1.0 and HTTP/1.1 are)", 505))
            else:
                self.events.append(ParseError(_reason(exc)))
            return
        # A head still incomplete but already too big: stop buffering it.
        if self._in_head and self._head_bytes > self._max_header_bytes:
            self.broken = True
            self.events.append(ParseError("request header section too large", 431))

    def close(self) -> None:
        """Break the reader/parser reference cycle once the connection is done."""
        self._parser = None

    def feed_eof(self) -> None:
        """The client closed its side; a message cut short is an error."""
        if not self.broken and not self._in_head:
            self.broken = True
            self.events.append(ParseError("client closed the connection mid-request"))

    @property
    def mid_message(self) -> bool:
        return not self._in_head or self._head_bytes > 0

    # httptools callbacks -------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._noted = []
        self._forward = []
        self._trailers = None
        self._head_size = 16  # method, spaces, version and CRLF, about

    def on_url(self, url: bytes) -> None:
        self._url += url  # usually one piece: b"" + url is url itself, no copy
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            self._trailers = _add_trailer(self._trailers, name, value)
            return
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        # Sorted once, here, for check_request and upstream_request_head (see RequestHead).
        lname = name.lower()
        forwarded = REQUEST_NOTED.get(lname)
        if forwarded is not None:
            self._noted.append((lname, value))
            if not forwarded:
                return
        self._forward += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        p = self._parser
        assert p is not None  # called back by the parser itself
        # The head arrived whole in one read: check what was parsed.
        if self._head_size > self._max_header_bytes:
            raise _HeadTooLarge()
        # Positional arguments, in field order: half the cost of keywords for a slots dataclass.
        self.events.append(
            RequestHead(
                p.get_method(),  # method
                self._url,  # target
                p.get_http_version(),  # version
                self._headers,  # headers
                p.should_keep_alive(),  # keep_alive
                p.should_upgrade(),  # upgrade
                None,  # host (check_request fills in this and the next six)
                "/",  # path
                "",  # query
                None,  # content_length
                False,  # chunked
                False,  # expect_continue
                _NO_TOKENS,  # connection_tokens
                self._noted,  # noted
                self._forward,  # forward
            )
        )
        self._in_head = False
        self._head_bytes = 0

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(END if self._trailers is None else End(self._trailers))
        self._in_head = True


class ResponseReader:
    """Parses the responses of one backend connection (1xx interim responses included).

    One reader serves every exchange on a keep-alive connection: ``start`` before
    each request. Reusing the parser saves building one (and its bound callbacks)
    per request, and the reader/parser reference cycle that only the cyclic
    garbage collector could free; ``close`` breaks that cycle.
    """

    # Set by start, per exchange.
    _cut_short: bool
    done: bool
    broken: bool
    # Set by on_message_begin, per message.
    _headers: Headers
    _forward: list[bytes]

    def __init__(self, request_method: bytes = b"GET") -> None:
        self.events: deque[Event] = deque()
        self._parser: httptools.HttpResponseParser | None = None
        self.start(request_method)

    def start(self, request_method: bytes) -> None:
        """Get ready for the response to a request made with ``request_method``."""
        self.events.clear()
        # A response we cut short ourselves (HEAD) leaves llhttp mid-message: a new parser then.
        if self._parser is None or self._cut_short or self.broken:
            self._parser = httptools.HttpResponseParser(self)
        self._head_request = request_method == b"HEAD"
        self._cut_short = False
        self.done = False  # final response complete
        self.broken = False
        # The per-message state is (re)set by on_message_begin.

    def close(self) -> None:
        self._parser = None

    def feed(self, data: bytes) -> None:
        if self.broken or self.done:
            return
        assert self._parser is not None, "feed after close"
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.broken = True
            self.events.append(Upgrade(data[exc.args[0] :]))
        except httptools.HttpParserError as exc:
            self.broken = True
            if isinstance(exc.__context__, _BadResponseHead):
                self.events.append(ParseError(str(exc.__context__), 502))
            else:
                self.events.append(ParseError(_reason(exc), 502))

    # httptools callbacks -------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:
            # Bytes after the final response, in the same read: the backend is out of step
            # with us, so its connection must not serve another request.
            self.broken = True
        self._headers = []
        self._forward = []
        self._vias: list[bytes] | None = None  # made when a Via field arrives
        self._upgrade = b""
        self._trailers: Headers | None = None  # made when a trailer field arrives
        self._reason = b""
        self._in_head = True
        self._content_length: int | None = None
        self._chunked = False
        self._codings: bytes | None = None  # the Transfer-Encoding field(s), if any
        self._tokens: list[bytes] | None = None  # made when a Connection field arrives

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            self._trailers = _add_trailer(self._trailers, name, value)
            return
        self._headers.append((name, value))
        # The few fields framing depends on, and the ones not forwarded, noted once as they
        # arrive; the rest is serialised for client_response_head (see ResponseHead).
        if len(name) in _NOTED_NAME_LENGTHS:
            lname = name.lower()
            if lname in RESPONSE_NOT_FORWARDED:
                if lname == b"transfer-encoding":
                    if self._codings is not None:
                        self._codings += b", " + value  # refused at the end of the head
                    else:
                        self._codings = value
                    self._chunked = value.strip().lower().endswith(b"chunked")
                elif lname == b"connection":
                    if self._tokens is None:
                        self._tokens = []
                    if b"," in value:
                        self._tokens.extend(t.strip().lower() for t in value.split(b",") if t.strip())
                    else:
                        token = value.strip().lower()
                        if token:
                            self._tokens.append(token)
                elif lname == b"via":
                    if self._vias is None:
                        self._vias = []
                    self._vias.append(value)
                elif lname == b"upgrade":
                    self._upgrade = value
                return
            if lname == b"content-length":
                self._content_length = int(value)
        self._forward += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        p = self._parser
        assert p is not None  # called back by the parser itself
        status = p.get_status_code()
        if not 100 <= status <= 599:
            # llhttp takes any three digits: a 0xx would pass for an interim response and be
            # relayed as one. RFC 9110 15: outside 100-599 is invalid, to be handled as a 5xx.
            raise _BadResponseHead(f"invalid status code {status:03d}")
        if status in _LLHTTP_INTERIM_WITH_BODY and (self._codings is not None or self._content_length is not None):
            raise _BadResponseHead(f"a {status} interim response announces content (RFC 9110 15.2)")
        if self._codings is not None and self._codings.strip().lower() != b"chunked":
            # We re-frame the body and send our own Transfer-Encoding: a coding like gzip
            # would reach the client undeclared (the request side refuses them too).
            raise _BadResponseHead(f"unsupported Transfer-Encoding {self._codings.decode('latin-1')!r}")
        reason = self._reason
        if _CONTROL_BYTE.search(reason):
            # llhttp lets NUL and other control bytes through (RFC 9112 4: HTAB, SP, VCHAR
            # and obs-text only). The phrase means nothing to a client: send the standard one.
            reason = b""
        # Positional arguments, in field order: half the cost of keywords for a slots dataclass.
        head = ResponseHead(
            status,  # status
            reason,  # reason
            p.get_http_version(),  # version
            self._headers,  # headers
            p.should_keep_alive(),  # keep_alive
            self._content_length,  # content_length
            self._chunked,  # chunked
            frozenset(self._tokens) if self._tokens else _NO_TOKENS,  # connection_tokens
            self._forward,  # forward
            self._vias or [],  # vias
            self._upgrade,  # upgrade_value
        )
        self._in_head = False
        self._final = status >= 200
        self.events.append(head)
        if self._head_request and status >= 200:
            # llhttp cannot be told that a HEAD response has no body: end it here.
            self.events.append(END)
            self.done = True
            self._cut_short = True

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.events.append(body)

    def on_message_complete(self) -> None:
        if self.done:
            return
        self.events.append(END if self._trailers is None else End(self._trailers))
        if self._final:
            self.done = True


# Lengths of content-length and of the names in RESPONSE_NOT_FORWARDED: a cheap first filter.
_NOTED_NAME_LENGTHS = frozenset({len(n) for n in RESPONSE_NOT_FORWARDED} | {len(b"content-length")})
_NO_TOKENS: frozenset[bytes] = frozenset()


def _add_trailer(trailers: Headers | None, name: bytes, value: bytes) -> Headers:
    """A trailer field (after a chunked body) added to the list, made at the first one."""
    if trailers is None:
        trailers = []
    trailers.append((name, value))
    return trailers


# Bytes a reason phrase may not hold (RFC 9112 4): the controls but HTAB, and DEL.
_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# 1xx statuses whose Content-Length or chunked Transfer-Encoding llhttp honours, reading
# a body that RFC 9110 15.2 says a 1xx never has (it knows 100, 101, 102 and 103 have
# none). Reading one would swallow bytes the backend meant as its next response.
_LLHTTP_INTERIM_WITH_BODY = frozenset(range(104, 200))


class _BadResponseHead(Exception):
    """Raised inside the httptools callback for a response head we refuse (502)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed HTTP: {reason}")


class _HeadTooLarge(Exception):
    """Raised inside the httptools callback; httptools re-raises it as a parser error."""


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"malformed HTTP: {text}"
