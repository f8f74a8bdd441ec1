"""Hypothesis strategies for the fuzzer: HTTP/1.1 messages built field by field, then mutated.

Owns generating byte streams that sit near the framing rules a smuggler plays with
(Content-Length and Transfer-Encoding, chunk sizes, line endings, obs-fold, NUL, huge
fields, pipelining). It must never decide what the bytes mean: the oracle does.
"""

from __future__ import annotations

from hypothesis import strategies as st

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT"]
# Field names the proxy treats specially, each worth hitting often.
SPECIAL_NAMES = [
    b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Keep-Alive", b"TE",
    b"Upgrade", b"Expect", b"X-Forwarded-For", b"X-Forwarded-Host", b"X-Forwarded-Proto", b"Via",
    b"Proxy-Connection", b"Trailer", b"content-length", b"transfer-encoding", b"HOST",
]
# Values that change framing or routing when they land in the right field.
SPECIAL_VALUES = [
    b"chunked", b"Chunked", b"gzip, chunked", b"chunked, gzip", b" chunked", b"identity", b"0", b"5",
    b"+5", b"-1", b"5, 5", b"05", b"1e3", b"close", b"keep-alive", b"upgrade", b"Upgrade, close",
    b"Content-Length", b"Host", b"100-continue", b"websocket", b"", b"x\x00y", b"a\tb", b"\xff",
    b"example.com", b"[::1]:80", b"203.0.113.9", b"1.0 edge", b"trailers",
]
def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (st.integers would favour 0, its boundary)."""
    return st.sampled_from([True] + [False] * (n - 1))


token = st.text(TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
field_value = st.one_of(
    st.sampled_from(SPECIAL_VALUES),
    st.binary(max_size=24).filter(lambda v: b"\r" not in v and b"\n" not in v),
    st.text("abcxyz019 ,;=-/", max_size=20).map(str.encode),
)
field_name = st.one_of(st.sampled_from(SPECIAL_NAMES), token)
eol = st.sampled_from([b"\r\n"] * 30 + [b"\n", b"\r", b"\r\r\n", b"\n\r"])


@st.composite
def header_lines(draw: st.DrawFn) -> list[bytes]:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(field_name)
        sep = draw(st.sampled_from([b":", b": ", b":  ", b" :", b":\t"] + [b": "] * 6))
        value = draw(field_value)
        line = name + sep + value + draw(st.sampled_from([b""] * 8 + [b" ", b"\t"]))
        if draw(one_in(21)):
            line += b"\r\n " + draw(field_value)  # obs-fold
        lines.append(line)
    return lines


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` in chunks, with the odd extension, upper-case hex, leading zeros or bad size."""
    out = []
    rest = body
    while rest:
        n = draw(st.integers(1, max(1, len(rest))))
        piece, rest = rest[:n], rest[n:]
        size = b"%x" % n
        style = draw(st.integers(0, 12))
        if style == 1:
            size = size.upper()
        elif style == 2:
            size = b"000" + size
        elif style == 3:
            size += b";ext=" + draw(token)
        elif style == 4:
            size = b"%x" % (n + draw(st.sampled_from([-1, 1, 16])))  # a lie about the size
        elif style == 5:
            size += b" "
        elif style == 6:
            size = b"0x" + size
        out.append(size + b"\r\n" + piece + draw(st.sampled_from([b"\r\n"] * 8 + [b"\n", b"", b"\r\nX"])))
    out.append(draw(st.sampled_from([b"0", b"00", b"0;x=y", b"0 "])) + b"\r\n")
    for line in draw(header_lines()):
        out.append(line + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


@st.composite
def request_bytes(draw: st.DrawFn, host_header: bool = True) -> bytes:
    """One request: mostly well-formed, with a few of the mutations smugglers use."""
    # llhttp knows a fixed list of methods and refuses the rest: mostly known ones, then.
    method = draw(token) if draw(one_in(10)) else draw(st.sampled_from(METHODS))
    target = draw(st.one_of(
        st.text("abcz/019-._~%?=&", max_size=20).map(lambda t: b"/" + t.encode()),
        st.sampled_from([b"*", b"http://example.com/p?q", b"http://other:8080", b"https://x/y",
                         b"example.com:443", b"//double", b"/a b", b"/\x00", b"/\xff"]),
    ))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 10 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9",
                                                          b"http/1.1", b"HTTP/1.10"]))
    line_sp = draw(st.sampled_from([b" "] * 10 + [b"  ", b"\t"]))
    lines = [method + line_sp + target + b" " + version]
    if host_header and draw(st.integers(0, 9)):
        lines.append(b"Host: " + draw(st.sampled_from([b"example.com", b"backend", b"[::1]:8080", b"x:1"])))
    body = draw(st.binary(max_size=64))
    if draw(one_in(12)):
        # Above the pool's retry_buffer_bytes (64 KiB): the node streams it to the backend.
        body += b"s" * (70 * 1024)
    if draw(one_in(8)):
        lines.append(b"Expect: 100-continue")  # streamed too, after the head
    framing = draw(st.sampled_from(["cl", "cl", "chunked", "chunked", "none", "cl+te", "cl2", "badcl"]))
    if framing in ("cl", "cl+te"):
        lines.append(b"Content-Length: %d" % len(body))
    if framing == "cl2":
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + draw(st.integers(0, 3)))]
    if framing == "badcl":
        lines.append(b"Content-Length: " + draw(st.sampled_from([b"+%d", b"%d ", b" %d", b"0%d", b"%d,%d"]))
                     .replace(b"%d", b"%d" % len(body)))
    if framing in ("chunked", "cl+te"):
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked"] * 6 + [b"gzip, chunked", b"Chunked",
                                                                                     b"chunked, identity", b" chunked"])))
    extra = draw(header_lines())
    at = draw(st.integers(1, len(lines)))
    lines[at:at] = extra
    line_end = draw(eol)
    head = line_end.join(lines) + line_end + draw(eol)
    if framing in ("chunked", "cl+te"):
        payload = draw(chunked_body(body))
    elif framing == "none":
        payload = b""
    else:
        payload = body
    return head + payload


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """A few byte-level edits: insert, delete or replace (CR, LF, NUL, space, colon, digits...)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        if not out:
            break
        at = draw(st.integers(0, len(out) - 1))
        byte = draw(st.sampled_from([b"\r", b"\n", b"\x00", b" ", b":", b"0", b"9", b"\t", b"\x7f", b";", b","]))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            out[at:at] = byte
        elif kind == 1:
            del out[at]
        else:
            out[at : at + 1] = byte
    return bytes(out)


@st.composite
def request_stream(draw: st.DrawFn) -> bytes:
    """One to three pipelined requests, maybe mutated, now and then a huge field."""
    parts = [draw(request_bytes()) for _ in range(draw(st.integers(1, 3)))]
    data = b"".join(parts)
    if draw(one_in(16)):
        size = draw(st.sampled_from([8 * 1024, 64 * 1024 - 64, 64 * 1024 + 1, 200 * 1024]))
        where = data.find(b"\r\n")
        if where > 0:
            data = data[:where] + b"\r\nX-Huge: " + b"a" * size + data[where:]
    if draw(one_in(3)):
        data = draw(mutated(data))
    return data


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut into the pieces a socket might deliver."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=6))))
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(data[last:cut])
        last = cut
    pieces.append(data[last:])
    return [p for p in pieces if p]


STATUS_CODES = [100, 101, 102, 103, 199, 200, 201, 204, 206, 301, 304, 400, 404, 500, 502, 503, 999, 0, 1000]


@st.composite
def response_bytes(draw: st.DrawFn) -> bytes:
    """A response, perhaps after interim 1xx ones, framed by CL, chunked, or the close."""
    out = b""
    for _ in range(draw(st.integers(0, 2))):
        out += b"HTTP/1.1 " + draw(st.sampled_from([b"100 Continue", b"103 Early Hints", b"102 x"])) + b"\r\n"
        out += b"".join(line + b"\r\n" for line in draw(header_lines())) + b"\r\n"
    status = draw(st.sampled_from(STATUS_CODES))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x"]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Weird \xff reason", b" A\tB"]))
    lines = [version + b" " + b"%d" % status + reason]
    body = draw(st.binary(max_size=64))
    framing = draw(st.sampled_from(["cl", "cl", "chunked", "chunked", "close", "cl+te", "cl2", "badcl"]))
    if framing in ("cl", "cl+te"):
        lines.append(b"Content-Length: %d" % len(body))
    if framing == "cl2":
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + draw(st.integers(0, 2)))]
    if framing == "badcl":
        lines.append(b"Content-Length: " + draw(st.sampled_from([b"+%d", b"%d ", b"0%d", b"%d,%d"]))
                     .replace(b"%d", b"%d" % len(body)))
    if framing in ("chunked", "cl+te"):
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked"] * 4 + [b"gzip, chunked", b"chunked, gzip",
                                                                                     b"identity"])))
    lines[1:1] = draw(header_lines())
    line_end = draw(eol)
    out += line_end.join(lines) + line_end + draw(eol)
    out += draw(chunked_body(body)) if framing in ("chunked", "cl+te") else body
    if draw(one_in(4)):
        out += b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"  # bytes after the response
    if draw(st.booleans()):
        out = draw(mutated(out))
    return out
