"""HTTP/1.1 framing: bytes in, events out, with httptools (llhttp) doing the parsing.

httptools calls back synchronously while it parses; these collectors turn the
callbacks into a queue of events (a head, body ``bytes``, ``End``, ``Upgrade``,
``ParseError``) that the proxy loop consumes in order, like h11's
``next_event``. Pure: no sockets, no clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import httptools

from lbnode.http.headers import Headers, RequestHead, ResponseHead


@dataclass(slots=True)
class End:
    """The message is complete; ``trailers`` are the chunked trailer fields, if any."""

    trailers: Headers


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
        self._parser = httptools.HttpRequestParser(self)
        self._max_header_bytes = max_header_bytes
        self._in_head = True  # between messages or inside a head
        self._head_bytes = 0
        self._url: list[bytes] = []
        self._headers: Headers = []
        self._trailers: Headers = []
        self.broken = False  # after a parse error or upgrade nothing more is parsed

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        if self._in_head:
            self._head_bytes += len(data)
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
            else:
                self.events.append(ParseError(_reason(exc)))
            return
        # A head still incomplete but already too big: stop buffering it.
        if self._in_head and self._head_bytes > self._max_header_bytes:
            self.broken = True
            self.events.append(ParseError("request header section too large", 431))

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
        self._url = []
        self._headers = []
        self._trailers = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        (self._headers if self._in_head else self._trailers).append((name, value))

    def on_headers_complete(self) -> None:
        p = self._parser
        # The head arrived whole in one read: measure what was parsed
        # (request line + "name: value\r\n" per field).
        size = sum(len(u) for u in self._url) + 16 + sum(len(n) + len(v) + 4 for n, v in self._headers)
        if size > self._max_header_bytes:
            raise _HeadTooLarge()
        self.events.append(
            RequestHead(
                method=p.get_method(),
                target=b"".join(self._url),
                version=p.get_http_version(),
                headers=self._headers,
                keep_alive=p.should_keep_alive(),
                upgrade=p.should_upgrade(),
            )
        )
        self._in_head = False
        self._head_bytes = 0

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(End(self._trailers))
        self._in_head = True


class ResponseReader:
    """Parses one backend response (and the 1xx interim responses before it)."""

    def __init__(self, request_method: bytes) -> None:
        self.events: deque[Event] = deque()
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = request_method == b"HEAD"
        self._reason = b""
        self._headers: Headers = []
        self._trailers: Headers = []
        self._in_head = True
        self.done = False  # final response complete
        self.broken = False

    def feed(self, data: bytes) -> None:
        if self.broken or self.done:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.broken = True
            self.events.append(Upgrade(data[exc.args[0] :]))
        except httptools.HttpParserError as exc:
            self.broken = True
            self.events.append(ParseError(_reason(exc), 502))

    # httptools callbacks -------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = []
        self._trailers = []
        self._reason = b""
        self._in_head = True
        self._content_length: int | None = None
        self._chunked = False
        self._tokens: list[bytes] = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            self._trailers.append((name, value))
            return
        self._headers.append((name, value))
        # The few fields framing depends on, noted once as they arrive.
        if len(name) in _FRAMING_NAME_LENGTHS:
            lname = name.lower()
            if lname == b"content-length":
                self._content_length = int(value)
            elif lname == b"transfer-encoding":
                self._chunked = value.strip().lower().endswith(b"chunked")
            elif lname == b"connection":
                self._tokens.extend(t.strip().lower() for t in value.split(b",") if t.strip())

    def on_headers_complete(self) -> None:
        p = self._parser
        status = p.get_status_code()
        head = ResponseHead(
            status=status,
            reason=self._reason,
            version=p.get_http_version(),
            headers=self._headers,
            keep_alive=p.should_keep_alive(),
            content_length=self._content_length,
            chunked=self._chunked,
            connection_tokens=frozenset(self._tokens),
        )
        self._in_head = False
        self.events.append(head)
        if self._head_request and status >= 200:
            # llhttp cannot be told that a HEAD response has no body: end it here.
            self.events.append(End([]))
            self.done = True

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.events.append(body)

    def on_message_complete(self) -> None:
        if self.done:
            return
        self.events.append(End(self._trailers))
        if self._parser.get_status_code() >= 200:
            self.done = True


# len("content-length"), len("transfer-encoding"), len("connection"): a cheap first filter.
_FRAMING_NAME_LENGTHS = frozenset({14, 17, 10})


class _HeadTooLarge(Exception):
    """Raised inside the httptools callback; httptools re-raises it as a parser error."""


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"malformed HTTP: {text}"
