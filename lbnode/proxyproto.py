"""The PROXY protocol (versions 1 and 2): the header another balancer puts before a connection's
bytes to say whose connection it is, and the header this node puts before its own.

Owns the parse of that header as it arrives (possibly split over TCP segments) and the
encoders; the rules are HAProxy's specification (doc/proxy-protocol.txt, 2.9). Pure: bytes
in, a result out; no sockets, no clock. Never raises on any input: garbage is an ``Error``
with a reason for the log, never an exception.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

# Version 2 starts with these 12 bytes: chosen by the specification so that no other protocol
# (HTTP, TLS, SMTP...) can begin with them, and so that a server not expecting it rejects it.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
# The longest version 1 line, CRLF included ("PROXY UNKNOWN" + two full IPv6 addresses and
# ports): a line without CRLF within this many bytes is invalid (specification 2.1).
V1_MAX = 107
# Version 2: a 16-byte fixed part, then the length it announces (addresses, then TLVs).
V2_FIXED = 16
# Default bound on that announced length: addresses (at most 216, AF_UNIX) plus TLVs. Senders
# put a few small TLVs there (ALPN, authority, a unique id, AWS/Azure ids: tens of bytes); 4 KiB
# leaves room for them all while a peer cannot make us hold more.
DEFAULT_MAX_V2_LENGTH = 4096
# Bytes the parser needs to tell v1 from v2 from "not a PROXY header at all": the v2 signature.
_DETECT = len(V2_SIGNATURE)

_V2_VERSION = 0x2
_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM = 0x0, 0x1, 0x2
# Address block length each family announces (two addresses and, for IP, two ports).
_ADDRESS_BYTES = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_DIGITS = frozenset(b"0123456789")
_HEX_COLON = frozenset(b"0123456789abcdefABCDEF:")
_V4_MAPPED = bytes(10) + b"\xff\xff"
# Addresses come out as the C library writes them, as socket.getpeername() does: a client is
# the same string whether it connected directly or through a balancer (affinity keys, logs).
_ntop = socket.inet_ntop

Endpoint = tuple[str, int]  # (IP address as Python writes it, port)


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Every byte so far belongs to a valid beginning of a header; read more."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """A complete header of ``length`` bytes; ``rest`` is what followed it in the bytes given.

    ``source`` and ``dest`` are None when the header says to use the connection's own
    endpoints: a v2 LOCAL command (the peer balancer's health check), v1 ``UNKNOWN``, or a
    v2 family or protocol that carries no TCP/IP address (AF_UNSPEC, AF_UNIX, UDP)."""

    version: int  # 1 or 2
    source: Endpoint | None
    dest: Endpoint | None
    length: int
    rest: bytes = b""


@dataclass(frozen=True, slots=True)
class Error:
    """Not a PROXY header, or a malformed one; ``reason`` is for the log."""

    reason: str


ParseResult = NeedMore | Parsed | Error
NEED_MORE = NeedMore()


def parse_proxy_header(data: bytes, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> ParseResult:
    """Judge the first bytes of a connection: need more, a complete header, or an error.

    ``NeedMore`` guarantees that every byte given is part of the header (none of the
    client's own bytes is in it yet), so a reader may consume them all before waiting."""
    n = min(len(data), _DETECT)
    if data[:n] == V2_SIGNATURE[:n] and n:
        return _parse_v2(data, max_v2_length) if n == _DETECT else NEED_MORE
    n = min(len(data), len(V1_PREFIX))
    if data[:n] == V1_PREFIX[:n]:
        return _parse_v1(data) if n == len(V1_PREFIX) else NEED_MORE
    shown = bytes(data[:16])
    return Error(f"not a PROXY protocol header (first bytes {shown!r})")


def _parse_v1(data: bytes) -> ParseResult:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        lf = data.find(b"\n", 0, V1_MAX)
        if lf >= 0:
            return Error("v1 line ends with a bare LF, not CRLF")
        if len(data) >= V1_MAX:
            return Error(f"v1 line without CRLF within {V1_MAX} bytes")
        cr = data.find(b"\r", 0, len(data) - 1)
        if cr >= 0:
            return Error("v1 line has a CR not followed by LF")
        return NEED_MORE
    line = bytes(data[:end])
    if b"\n" in line or b"\r" in line:
        return Error("v1 line has a CR or LF before its CRLF")
    length = end + 2
    rest = bytes(data[length:])
    fields = line.split(b" ")
    proto = fields[1] if len(fields) > 1 else b""
    if proto == b"UNKNOWN":
        # The receiver must ignore anything before the CRLF (specification 2.1).
        return Parsed(1, None, None, length, rest)
    if proto not in (b"TCP4", b"TCP6"):
        return Error(f"v1 protocol {proto[:16]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        return Error(f"v1 {proto.decode()} line has {len(fields)} fields, not 6 (exactly one space between each)")
    try:
        if proto == b"TCP4":
            src_ip, dst_ip = _v1_ipv4(fields[2]), _v1_ipv4(fields[3])
        else:
            src_ip, dst_ip = _v1_ipv6(fields[2]), _v1_ipv6(fields[3])
        src_port, dst_port = _v1_port(fields[4]), _v1_port(fields[5])
    except ValueError as exc:
        return Error(f"v1 {proto.decode()} line: {exc}")
    return Parsed(1, (src_ip, src_port), (dst_ip, dst_port), length, rest)


def _v1_ipv4(raw: bytes) -> str:
    # The C library's inet_pton is the strict form the specification asks for: 4 decimal
    # numbers 0-255, no leading zeros (so no octal reading), nothing else.
    try:
        socket.inet_pton(socket.AF_INET, raw.decode("ascii"))
    except (OSError, ValueError):  # ValueError: not ASCII, or a NUL byte
        raise ValueError(f"{raw[:40]!r} is not an IPv4 address (4 numbers 0-255, no leading zeros)") from None
    return raw.decode("ascii")


def _v1_ipv6(raw: bytes) -> str:
    # Hex digits and colons only: inet_pton would also take an embedded IPv4 address.
    if not raw or len(raw) > 39 or not _HEX_COLON.issuperset(raw):
        raise ValueError(f"{raw[:40]!r} is not an IPv6 address")
    try:
        return _ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, raw.decode("ascii")))
    except (OSError, ValueError):  # ValueError: not ASCII
        raise ValueError(f"{raw[:40]!r} is not an IPv6 address") from None


def _v1_port(raw: bytes) -> int:
    if not raw or not _DIGITS.issuperset(raw) or len(raw) > 5 or (len(raw) > 1 and raw[0] == 0x30) or int(raw) > 65535:
        raise ValueError(f"{raw[:8]!r} is not a port (0-65535, no leading zeros)")
    return int(raw)


def _parse_v2(data: bytes, max_length: int) -> ParseResult:
    if len(data) > _DETECT:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != _V2_VERSION:
            return Error(f"v2 header of version {version}, not 2")
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            return Error(f"v2 command {command} is neither LOCAL (0) nor PROXY (1)")
    if len(data) > _DETECT + 1:
        family, proto = data[13] >> 4, data[13] & 0x0F
        if family not in _ADDRESS_BYTES:
            return Error(f"v2 address family {family} is not one of 0-3")
        if proto not in (_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM):
            return Error(f"v2 transport protocol {proto} is not one of 0-2")
    if len(data) < V2_FIXED:
        return NEED_MORE
    command, family, proto = data[12] & 0x0F, data[13] >> 4, data[13] & 0x0F
    (announced,) = struct.unpack_from("!H", data, 14)
    if announced > max_length:
        return Error(f"v2 header announces {announced} bytes, over the {max_length}-byte limit")
    needed = _ADDRESS_BYTES[family] if proto != _PROTO_UNSPEC else 0
    if command == _CMD_PROXY and announced < needed:
        return Error(f"v2 length {announced} is shorter than the {needed}-byte address block of its family")
    length = V2_FIXED + announced
    if len(data) < length:
        return NEED_MORE
    rest = bytes(data[length:])
    body = bytes(data[V2_FIXED:length])
    # Use the addresses only for TCP over IPv4/IPv6 with the PROXY command. LOCAL and UNSPEC
    # (whose block the receiver must ignore: it is not even known to hold TLVs), AF_UNIX and
    # UDP fall back to the connection's own endpoints, as the specification allows a receiver
    # that does not implement them.
    if command == _CMD_LOCAL or family == _AF_UNSPEC or proto == _PROTO_UNSPEC:
        return Parsed(2, None, None, length, rest)
    problem = _check_tlvs(body, needed)
    if problem:
        return Error(problem)
    if proto != _PROTO_STREAM or family not in (_AF_INET, _AF_INET6):
        return Parsed(2, None, None, length, rest)
    af, size = (socket.AF_INET, 4) if family == _AF_INET else (socket.AF_INET6, 16)
    src, dst = _ntop(af, body[:size]), _ntop(af, body[size : 2 * size])
    src_port, dst_port = struct.unpack_from("!HH", body, 2 * size)
    return Parsed(2, (src, src_port), (dst, dst_port), length, rest)


def _check_tlvs(body: bytes, pos: int) -> str | None:
    """TLVs after the addresses are skipped, but they must tile the rest of the header exactly."""
    while pos < len(body):
        if len(body) - pos < 3:
            return f"v2 TLV header cut short at byte {V2_FIXED + pos} of the header"
        (size,) = struct.unpack_from("!H", body, pos + 1)
        pos += 3 + size
        if pos > len(body):
            return f"v2 TLV of type 0x{body[pos - 3 - size]:02x} runs past the end of the header"
    return None


# --------------------------------------------------------------------------- encoders


def encode_v1(source: Endpoint | None, dest: Endpoint | None) -> bytes:
    """``PROXY TCP4|TCP6 src dst sport dport\r\n``; ``PROXY UNKNOWN\r\n`` without endpoints
    or when they are not of one family."""
    if source is None or dest is None:
        return b"PROXY UNKNOWN\r\n"
    (src_af, src), (dst_af, dst) = _packed(source[0]), _packed(dest[0])
    if src_af != dst_af:
        return b"PROXY UNKNOWN\r\n"
    if src_af == socket.AF_INET:
        text = f"TCP4 {_ntop(src_af, src)} {_ntop(dst_af, dst)}"
    else:
        # Python's form, never the C library's "::1.2.3.4" for an IPv4-compatible address:
        # a v1 line writes IPv6 in hex digits and colons only.
        text = f"TCP6 {ipaddress.IPv6Address(src)} {ipaddress.IPv6Address(dst)}"
    return f"PROXY {text} {source[1]} {dest[1]}\r\n".encode("ascii")


def encode_v2(source: Endpoint | None, dest: Endpoint | None) -> bytes:
    """The binary header: PROXY with TCP over IPv4/IPv6 addresses, or LOCAL (no addresses:
    a connection of this node's own, such as a health check) without endpoints."""
    if source is None or dest is None:
        return V2_SIGNATURE + bytes((_V2_VERSION << 4 | _CMD_LOCAL, 0)) + b"\x00\x00"
    (src_af, src), (dst_af, dst) = _packed(source[0]), _packed(dest[0])
    if src_af != dst_af:
        return V2_SIGNATURE + bytes((_V2_VERSION << 4 | _CMD_PROXY, 0)) + b"\x00\x00"
    family = _AF_INET if src_af == socket.AF_INET else _AF_INET6
    block = src + dst + struct.pack("!HH", source[1], dest[1])
    return (V2_SIGNATURE + bytes((_V2_VERSION << 4 | _CMD_PROXY, family << 4 | _PROTO_STREAM))
            + struct.pack("!H", len(block)) + block)


def encode(version: str, source: Endpoint | None, dest: Endpoint | None) -> bytes:
    """The header of ``version`` ("v1" or "v2", a pool's ``send_proxy``)."""
    return encode_v1(source, dest) if version == "v1" else encode_v2(source, dest)


def encode_own(version: str, own: Endpoint, peer: Endpoint) -> bytes:
    """The header of a connection this node opens for itself (a health check): v2 LOCAL; v1
    a TCP line with the connection's own endpoints, as the specification advises (2.1: some
    servers refuse ``UNKNOWN``, and a check must be accepted like any connection)."""
    return encode_v1(own, peer) if version == "v1" else encode_v2(None, None)


def _packed(ip: str) -> tuple[int, bytes]:
    """An address's family and bytes; ``::ffff:a.b.c.d`` (an IPv4 client of a dual-stack
    socket) as the IPv4 address it is. Raises ValueError for anything else."""
    try:
        if ":" not in ip:
            return socket.AF_INET, socket.inet_pton(socket.AF_INET, ip)
        packed = socket.inet_pton(socket.AF_INET6, ip)
    except OSError:
        raise ValueError(f"{ip!r} is not an IP address") from None
    if packed[:12] == _V4_MAPPED:
        return socket.AF_INET, packed[12:]
    return socket.AF_INET6, packed
