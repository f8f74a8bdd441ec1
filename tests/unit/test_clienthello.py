"""The ClientHello reader against real ClientHellos (Python's ssl over memory BIOs) and garbage."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbnode.tls.clienthello import (
    MAX_RECORD,
    NEED_MORE,
    NOT_TLS,
    ClientHello,
    ClientHelloReader,
    Malformed,
    NeedMore,
    NotTls,
    parse_client_hello,
)

RESULT_TYPES = (NeedMore, NotTls, Malformed, ClientHello)


def real_hello(server_name: str | None = "shop.example.com", alpn: list[str] | None = None,
               max_version: ssl.TLSVersion | None = None) -> bytes:
    """The exact bytes OpenSSL sends first, captured through memory BIOs (no socket)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def reframe(hello: bytes, record_size: int) -> bytes:
    """The same handshake message cut into TLS records of ``record_size`` bytes each."""
    assert hello[0] == 0x16
    message = hello[5:]
    out = bytearray()
    for i in range(0, len(message), record_size):
        part = message[i : i + record_size]
        out += hello[:3] + struct.pack(">H", len(part)) + part
    return bytes(out)


def with_extension(hello: bytes, ext_type: int, payload: bytes) -> bytes:
    """A real hello with one more extension, every length field fixed up (one record)."""
    message = bytearray(hello[5:])
    body = message[4:]
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    ext_len = int.from_bytes(body[pos : pos + 2], "big")
    ext = struct.pack(">HH", ext_type, len(payload)) + payload
    new_body = body[:pos] + struct.pack(">H", ext_len + len(ext)) + body[pos + 2 :] + ext
    message = bytes([1]) + len(new_body).to_bytes(3, "big") + new_body
    return reframe(hello[:5] + message, MAX_RECORD)


HELLO = real_hello("shop.example.com", ["h2", "http/1.1"])


def test_real_hello_gives_server_name_and_alpn() -> None:
    assert parse_client_hello(HELLO) == ClientHello("shop.example.com", ("h2", "http/1.1"))


def test_tls12_only_hello_and_no_alpn() -> None:
    hello = real_hello("db.internal", max_version=ssl.TLSVersion.TLSv1_2)
    assert parse_client_hello(hello) == ClientHello("db.internal", ())


def test_hello_without_sni() -> None:
    assert parse_client_hello(real_hello(None)) == ClientHello(None, ())


def test_server_name_is_lower_cased_without_trailing_dot() -> None:
    hello = real_hello("Shop.Example.COM.")
    assert parse_client_hello(hello) == ClientHello("shop.example.com", ())


def test_every_prefix_needs_more_and_eof_is_malformed() -> None:
    for cut in range(len(HELLO)):
        assert parse_client_hello(HELLO[:cut]) is NEED_MORE, cut
    reader = ClientHelloReader()
    assert reader.feed(HELLO[:100]) is NEED_MORE
    result = reader.feed_eof()
    assert isinstance(result, Malformed)
    assert "100 bytes of an incomplete ClientHello" in result.reason


def test_one_byte_segments() -> None:
    reader = ClientHelloReader()
    results = [reader.feed(HELLO[i : i + 1]) for i in range(len(HELLO))]
    assert all(r is NEED_MORE for r in results[:-1])
    assert results[-1] == ClientHello("shop.example.com", ("h2", "http/1.1"))
    assert bytes(reader.buffered) == HELLO


@pytest.mark.parametrize("record_size", [1, 2, 3, 4, 5, 50, 511])
def test_hello_split_over_records(record_size: int) -> None:
    framed = reframe(HELLO, record_size)
    assert parse_client_hello(framed) == ClientHello("shop.example.com", ("h2", "http/1.1"))


def test_not_tls() -> None:
    assert parse_client_hello(b"GET / HTTP/1.1\r\n") is NOT_TLS
    assert parse_client_hello(b"\x80\x2e\x01\x03\x01") is NOT_TLS  # SSLv2-style hello
    assert ClientHelloReader().feed(b"S") is NOT_TLS  # the first byte is enough


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x16\x03\x01\x00\x00", "empty handshake record"),
        (b"\x16\x02\x00\x00\x10", "record version 2.0 is not TLS"),
        (b"\x16\x03\x01\x48\x01", "over the 16384-byte limit"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "of type 2, not ClientHello"),
        (HELLO[:5] + HELLO[5:9] + b"\x15\x03\x03\x00\x02\x02\x28", None),
    ],
)
def test_malformed_records(data: bytes, reason: str | None) -> None:
    result = parse_client_hello(data)
    if reason is None:  # an alert record inside a hello: needs the rest of the record first
        assert result is NEED_MORE
        result = parse_client_hello(reframe(HELLO, 4)[:9] + b"\x15\x03\x03\x00\x02\x02\x28")
        assert isinstance(result, Malformed) and "content type 21" in result.reason
    else:
        assert isinstance(result, Malformed) and reason in result.reason, result


def test_hello_over_the_limit_is_refused_from_its_header() -> None:
    big = with_extension(HELLO, 0xFFFF - 2, b"\x00" * 3000)  # an unknown extension, like padding
    assert parse_client_hello(big) == ClientHello("shop.example.com", ("h2", "http/1.1"))
    reader = ClientHelloReader(max_hello=2048)
    # The handshake header (first 9 bytes) says 3000+ bytes: refused before the rest arrives.
    result = reader.feed(big[:9])
    assert isinstance(result, Malformed) and "over the 2048-byte limit" in result.reason
    assert reader.feed(big[9:]) is result


def test_bad_server_names() -> None:
    for name, reason in [(b"a\x00b.com", "is not a DNS name"), (b"", "empty server name"),
                         (b"..", "is not a DNS name"), (b"x" * 254, "a DNS name has at most 253")]:
        sni = struct.pack(">HBH", len(name) + 3, 0, len(name)) + name
        hello = with_extension(real_hello(None), 0, sni)
        result = parse_client_hello(hello)
        assert isinstance(result, Malformed) and reason in result.reason, (name, result)


def test_duplicate_extension_is_malformed() -> None:
    hello = with_extension(HELLO, 0, struct.pack(">HBH", 8, 0, 5) + b"a.com")
    result = parse_client_hello(hello)
    assert isinstance(result, Malformed) and "extension 0 appears twice" in result.reason


def test_length_field_past_the_end_is_malformed() -> None:
    # ALPN list that claims 200 bytes inside a 7-byte extension.
    hello = with_extension(real_hello("a.com"), 16, b"\x00\xc8\x02h2\x00\x00")
    result = parse_client_hello(hello)
    assert isinstance(result, Malformed) and "runs past the end" in result.reason


# --------------------------------------------------------------------------- properties

VARIANTS = [HELLO, real_hello("x.y"), real_hello(None, ["http/1.1"]),
            real_hello("legacy.example", max_version=ssl.TLSVersion.TLSv1_2)]
EXPECTED = [parse_client_hello(h) for h in VARIANTS]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(VARIANTS) - 1), record=st.integers(1, 600), cuts=st.lists(st.integers(0, 4000), max_size=40))
def test_any_split_over_segments_and_records_gives_the_same_answer(which: int, record: int, cuts: list[int]) -> None:
    framed = reframe(VARIANTS[which], record)
    points = sorted({c % (len(framed) + 1) for c in cuts} | {0, len(framed)})
    reader = ClientHelloReader()
    results = [reader.feed(framed[a:b]) for a, b in zip(points, points[1:], strict=False)]
    assert results[-1] == EXPECTED[which]
    assert all(r is NEED_MORE for r in results[:-1] if r is not results[-1])
    assert bytes(reader.buffered) == framed


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(VARIANTS) - 1), tail=st.binary(max_size=64))
def test_bytes_after_the_hello_are_never_read(which: int, tail: bytes) -> None:
    # Another record after the hello (a client may send early data right behind it).
    assert parse_client_hello(VARIANTS[which] + tail) == EXPECTED[which]


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=2048))
def test_garbage_never_raises(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), RESULT_TYPES)


@settings(max_examples=1000, deadline=None)
@given(body=st.binary(max_size=600), version=st.integers(0, 5))
def test_garbage_in_a_handshake_record_never_raises(body: bytes, version: int) -> None:
    data = bytes([0x16, 3, version]) + struct.pack(">H", len(body)) + body
    result = parse_client_hello(data)
    assert isinstance(result, RESULT_TYPES)
    if isinstance(result, ClientHello):
        assert result.server_name is None or result.server_name.isascii()


@settings(max_examples=1000, deadline=None)
@given(which=st.integers(0, len(VARIANTS) - 1), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=8),
       max_hello=st.integers(64, 20000))
def test_mutated_real_hellos_never_raise(which: int, flips: list[tuple[int, int]], max_hello: int) -> None:
    data = bytearray(VARIANTS[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    reader = ClientHelloReader(max_hello)
    result = reader.feed(bytes(data))
    assert isinstance(result, RESULT_TYPES)
    assert isinstance(reader.feed_eof(), (NotTls, Malformed, ClientHello))
    assert len(reader.buffered) == len(data)
