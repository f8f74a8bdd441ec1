"""The PROXY protocol parser and encoders: bytes in, results out, no sockets."""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbnode.model import (
    ConfigError,
    Listener,
    Table,
    parse_listener,
    parse_pool,
    pool_from_dict,
    pool_to_dict,
)
from lbnode.proxyproto import (
    NEED_MORE,
    V1_MAX,
    V2_SIGNATURE,
    Error,
    NeedMore,
    Parsed,
    encode,
    encode_own,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
HELLO = b"\x16\x03\x01\x00\x05hello"  # the start of a TLS record: what follows a header on https


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + struct.pack("!H", len(body)) + body


# --------------------------------------------------------------------------- version 1


def test_v1_tcp4_gives_the_client_and_the_bytes_after_the_line():
    line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    assert parse_proxy_header(line + REQUEST) == Parsed(
        1, ("192.0.2.1", 56324), ("198.51.100.2", 443), len(line), REQUEST
    )


def test_v1_tcp6_addresses_come_out_in_python_form():
    line = b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::1 65535 0\r\n"
    result = parse_proxy_header(line)
    assert result == Parsed(1, ("2001:db8::7", 65535), ("::1", 0), len(line))


def test_v1_unknown_means_the_connection_itself_whatever_follows_it():
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n" + REQUEST) == Parsed(1, None, None, 15, REQUEST)
    worst = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(worst) == V1_MAX
    assert parse_proxy_header(worst) == Parsed(1, None, None, V1_MAX)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n", "bare LF"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\rX\r\n", "CR or LF before"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n", "5 fields"),
        (b"PROXY TCP4 192.0.2.1  198.51.100.2 56324 443\r\n", "7 fields"),
        (b"PROXY TCP4 192.0.2.01 198.51.100.2 56324 443\r\n", "not an IPv4"),
        (b"PROXY TCP4 192.0.2.256 198.51.100.2 56324 443\r\n", "not an IPv4"),
        (b"PROXY TCP4 2001:db8::1 198.51.100.2 56324 443\r\n", "not an IPv4"),
        (b"PROXY TCP6 192.0.2.1 ::1 56324 443\r\n", "not an IPv6"),
        (b"PROXY TCP6 ::ffff:192.0.2.1 ::1 56324 443\r\n", "not an IPv6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 56324 443\r\n", "not an IPv6"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 056324 443\r\n", "not a port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n", "not a port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 443\r\n", "not a port"),
        (b"PROXY UDP4 192.0.2.1 198.51.100.2 1 443\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY tcp4 192.0.2.1 198.51.100.2 1 443\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UNKNOWNX\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY " + b"x" * 120, f"without CRLF within {V1_MAX}"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 443\rGET", "CR not followed by LF"),
    ],
)
def test_v1_lines_that_break_the_grammar_are_errors_naming_the_fault(line, reason):
    result = parse_proxy_header(line)
    assert isinstance(result, Error), result
    assert reason in result.reason


def test_a_v1_line_of_108_bytes_is_refused_even_with_its_crlf():
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == V1_MAX + 1
    assert isinstance(parse_proxy_header(line), Error)


def test_other_protocols_are_refused_at_their_first_byte():
    for other in (REQUEST, HELLO, b"SSH-2.0-OpenSSH_9.2\r\n"):
        assert isinstance(parse_proxy_header(other[:1]), Error), other
    assert isinstance(parse_proxy_header(b"PRIX"), Error)
    assert isinstance(parse_proxy_header(b"\r\n\r\nnot quite"), Error)
    assert parse_proxy_header(b"") == NEED_MORE
    assert parse_proxy_header(b"PROX") == NEED_MORE
    assert parse_proxy_header(V2_SIGNATURE[:11]) == NEED_MORE


# --------------------------------------------------------------------------- version 2


def test_v2_tcp4_and_tcp6_with_tlvs_skipped():
    tlvs = b"\x02\x00\x09a.example" + b"\x04\x00\x00"  # authority, then an empty NOOP
    header = v2(0x21, 0x11, bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 40000, 443) + tlvs)
    assert parse_proxy_header(header + HELLO) == Parsed(
        2, ("192.0.2.1", 40000), ("198.51.100.2", 443), len(header), HELLO
    )
    six = bytes(15) + b"\x01" + bytes(16) + struct.pack("!HH", 1, 2)
    assert parse_proxy_header(v2(0x21, 0x21, six)) == Parsed(2, ("::1", 1), ("::", 2), 16 + 36)


def test_v2_local_and_unspec_and_unix_and_udp_use_the_connection_itself():
    # LOCAL: the peer balancer's own connection (its health check), whatever the block says.
    assert parse_proxy_header(v2(0x20, 0x11, bytes(12))) == Parsed(2, None, None, 28)
    assert parse_proxy_header(v2(0x20, 0x00, b"")) == Parsed(2, None, None, 16)
    assert parse_proxy_header(v2(0x21, 0x00, b"anything")) == Parsed(2, None, None, 24)
    assert parse_proxy_header(v2(0x21, 0x31, bytes(216))) == Parsed(2, None, None, 16 + 216)
    assert parse_proxy_header(v2(0x21, 0x12, bytes(12))) == Parsed(2, None, None, 28)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (V2_SIGNATURE + b"\x11", "version 1, not 2"),
        (V2_SIGNATURE + b"\x22", "command 2"),
        (V2_SIGNATURE + b"\x21\x41", "address family 4"),
        (V2_SIGNATURE + b"\x21\x13", "transport protocol 3"),
        (v2(0x21, 0x11, bytes(11)), "shorter than the 12-byte address block"),
        (v2(0x21, 0x21, bytes(12)), "shorter than the 36-byte address block"),
        (V2_SIGNATURE + b"\x21\x11\x10\x01", "over the 4096-byte limit"),
        (v2(0x21, 0x11, bytes(12) + b"\x02\x00"), "TLV header cut short"),
        (v2(0x21, 0x11, bytes(12) + b"\x02\x00\x05abc"), "runs past the end"),
    ],
)
def test_v2_headers_that_break_the_format_are_errors_naming_the_fault(header, reason):
    result = parse_proxy_header(header)
    assert isinstance(result, Error), result
    assert reason in result.reason


def test_a_v2_header_over_the_limit_is_refused_before_its_bytes_arrive():
    assert isinstance(parse_proxy_header(V2_SIGNATURE + b"\x21\x11\x00\x40", max_v2_length=63), Error)
    assert parse_proxy_header(V2_SIGNATURE + b"\x21\x11\x00\x40", max_v2_length=64) == NEED_MORE


# --------------------------------------------------------------------------- encoders


def test_encoders_write_what_the_specification_shows():
    assert encode_v1(("192.0.2.1", 56324), ("198.51.100.2", 443)) == b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    assert encode_v1(("2001:db8::7", 1), ("::1", 80)) == b"PROXY TCP6 2001:db8::7 ::1 1 80\r\n"
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(None, None) == V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL
    assert encode_v2(("192.0.2.1", 1), ("198.51.100.2", 2)) == v2(
        0x21, 0x11, bytes([192, 0, 2, 1, 198, 51, 100, 2, 0, 1, 0, 2])
    )
    # an IPv4 client seen through a dual-stack socket is sent as the IPv4 client it is
    assert encode("v1", ("::ffff:192.0.2.1", 5), ("::ffff:192.0.2.2", 6)) == b"PROXY TCP4 192.0.2.1 192.0.2.2 5 6\r\n"


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
port = st.integers(0, 65535)


@st.composite
def endpoints(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    family = draw(st.sampled_from((ipv4, ipv6)))
    return (draw(family), draw(port)), (draw(family), draw(port))


@settings(max_examples=300, deadline=None)
@given(pair=endpoints(), version=st.sampled_from(("v1", "v2")), after=st.binary(max_size=64))
def test_what_we_encode_parses_back_to_the_same_endpoints(pair, version, after):
    source, dest = pair
    header = encode(version, source, dest)
    parsed = parse_proxy_header(header + after)
    assert isinstance(parsed, Parsed) and parsed.source is not None and parsed.dest is not None
    assert (parsed.version, parsed.length, parsed.rest) == (int(version[1]), len(header), after)
    # the same addresses (written as the C library writes them, like getpeername()), same ports
    assert [(ip_address(ip), port) for ip, port in (parsed.source, parsed.dest)] == [
        (ip_address(ip), port) for ip, port in (source, dest)]


def test_addresses_are_written_as_getpeername_writes_them():
    # A client is the same string through a balancer as directly (affinity keys, logs).
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        direct = s.getsockname()[0]
    header = encode_v2(("0:0:0:0:0:0:0:1", 1), ("::1", 2))
    assert parse_proxy_header(header).source == (direct, 1)  # type: ignore[union-attr]
    assert parse_proxy_header(b"PROXY TCP6 0:0:0:0:0:0:0:1 ::1 1 2\r\n").source == (direct, 1)  # type: ignore[union-attr]
    # and a v1 line never carries the "::1.2.3.4" form the C library uses for these
    assert encode_v1(("::102:304", 1), ("::1", 2)) == b"PROXY TCP6 ::102:304 ::1 1 2\r\n"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.one_of(endpoints(), st.just((None, None))), version=st.sampled_from(("v1", "v2")),
       after=st.binary(max_size=32))
def test_a_header_split_at_every_position_needs_more_until_its_last_byte(pair, version, after):
    header = encode(version, *pair)
    final = parse_proxy_header(header + after)
    assert isinstance(final, Parsed) and final.length == len(header) and final.rest == after
    for cut in range(len(header)):
        # Never a verdict on a prefix: NeedMore promises every byte so far is the header's.
        assert parse_proxy_header(header[:cut]) == NEED_MORE, cut


@settings(max_examples=1000, deadline=None)
@given(data=st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.lists(st.sampled_from([b"PROXY", b" ", b"TCP4", b"TCP6", b"UNKNOWN", b"1", b"0", b".", b":", b"\r", b"\n",
                              b"255", b"ffff", b"65535"]), max_size=40).map(b"".join),
))
def test_garbage_is_an_error_or_needs_more_never_an_exception(data):
    result = parse_proxy_header(data)
    assert isinstance(result, NeedMore | Parsed | Error)
    if isinstance(result, Parsed):
        assert 0 < result.length <= len(data) and data[result.length:] == result.rest
    # A verdict on a prefix stands: more bytes never turn an error into a header.
    for cut in range(len(data)):
        if isinstance(parse_proxy_header(data[:cut]), Error):
            assert isinstance(result, Error), (cut, result)
            break


# --------------------------------------------------------------------------- configuration


def listener_with(proxy_protocol: object) -> Listener:
    raw = {"name": "front", "protocol": "http", "bind": "127.0.0.1:0", "pool": "web", "proxy_protocol": proxy_protocol}
    return parse_listener(Table(raw, "listeners[0]"))


def test_accept_takes_the_trusted_networks_and_trusts_only_them():
    settings = listener_with({"accept": True, "trusted": ["192.0.2.0/24", "2001:db8::10"]}).proxy_protocol
    assert settings is not None
    assert settings.trusts("192.0.2.77") and settings.trusts("2001:db8::10")
    assert not settings.trusts("198.51.100.1") and not settings.trusts("2001:db8::11")
    assert listener_with({"accept": False}).proxy_protocol is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"trusted": ["192.0.2.1/32"]}, "listeners[0].proxy_protocol.accept: is required"),
        ({"accept": True}, "listeners[0].proxy_protocol.trusted: is required with accept = true"),
        ({"accept": True, "trusted": []}, "listeners[0].proxy_protocol.trusted: expected a non-empty list"),
        ({"accept": True, "trusted": ["192.0.2.1/24"]}, 'trusted[0]: "192.0.2.1/24" is not a CIDR'),
        ({"accept": True, "trusted": ["192.0.2.0/24", "eth0"]}, 'trusted[1]: "eth0" is not a CIDR'),
        ({"accept": True, "trusted": [1]}, "trusted[0]: expected a CIDR"),
        ({"accept": True, "trusted": ["192.0.2.0/24"], "v2": True}, "listeners[0].proxy_protocol.v2: unknown key"),
    ],
)
def test_proxy_protocol_settings_errors_name_the_key(table, message):
    with pytest.raises(ConfigError) as err:
        listener_with(table)
    assert message in str(err.value)


def test_send_proxy_is_a_pool_setting_that_survives_the_store_and_names_its_key():
    pool = parse_pool(Table({"name": "web", "send_proxy": "v2"}, "pools[0]"))
    assert pool.send_proxy == "v2"
    assert pool_from_dict(pool_to_dict(pool)) == pool  # etcd, the control API and lbctl carry it
    assert parse_pool(Table({"name": "web"}, "pools[0]")).send_proxy is None
    with pytest.raises(ConfigError) as err:
        parse_pool(Table({"name": "web", "send_proxy": "2"}, "pools[0]"))
    assert str(err.value) == 'pools[0].send_proxy: "2" is not one of: v1, v2'


def test_a_health_check_header_names_no_client():
    assert encode_own("v2", ("127.0.0.1", 5), ("127.0.0.2", 80)) == encode_v2(None, None)
    assert encode_own("v1", ("127.0.0.1", 5), ("127.0.0.2", 80)) == b"PROXY TCP4 127.0.0.1 127.0.0.2 5 80\r\n"
