"""The listener filter while VIPs move (SO_ATTACH_FILTER): refuse new connections to a VIP being
handed off; leave unanswered the stray packets to a VIP just taken over.

Loopback only: 127.0.0.1 plays the VIP being handed off, 127.0.0.3 the one taken over,
127.0.0.2 any other address. The stray-packet test sends a raw TCP segment (root only).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from lbnode.listen import set_vip_filter, vip_filter
from lbnode.model import VipSpec

HANDED_OFF, TAKEN_OVER, OTHER = "127.0.0.1", "127.0.0.3", "127.0.0.2"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(16)
    yield s
    s.close()


def test_new_connections_to_a_vip_handed_off_get_no_answer_and_the_rest_are_served(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    before = socket.create_connection((HANDED_OFF, port), timeout=1)
    accepted, _ = listener.accept()
    set_vip_filter(listener, [HANDED_OFF], [TAKEN_OVER])
    started = time.monotonic()
    with pytest.raises(TimeoutError):  # no reset: the SYN is dropped, a client would send it again
        socket.create_connection((HANDED_OFF, port), timeout=0.3)
    assert time.monotonic() - started >= 0.29
    other = socket.create_connection((OTHER, port), timeout=1)  # another address: served
    other_accepted, _ = listener.accept()
    # a VIP taken over: a client that speaks first connects (its data completes the handshake)
    taken = socket.create_connection((TAKEN_OVER, port), timeout=1)
    taken.sendall(b"GET")
    taken_accepted, _ = listener.accept()
    taken_accepted.settimeout(1)
    assert taken_accepted.recv(3) == b"GET"
    before.sendall(b"x")  # a connection accepted before: untouched
    assert accepted.recv(1) == b"x"
    set_vip_filter(listener, [])  # the moves are over: everyone again
    again = socket.create_connection((HANDED_OFF, port), timeout=1)
    for s in (before, accepted, other, other_accepted, taken, taken_accepted, again):
        s.close()


def _tcp_segment(src: str, sport: int, dst: str, dport: int, flags: int) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), random.getrandbits(32),
                         5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    data = pseudo + header
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return header[:16] + struct.pack("!H", ~total & 0xFFFF) + header[18:]


def _reset_for_stray_ack(port: int, dst: str) -> bool:
    """Send an ACK of no connection to dst:port; does a reset come back within 0.3 s?"""
    sport = random.randint(40000, 60000)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
        raw.settimeout(0.05)
        raw.sendto(_tcp_segment("127.0.0.1", sport, dst, port, 0x10), (dst, 0))
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            try:
                packet = raw.recv(4096)
            except TimeoutError:
                continue
            ihl = (packet[0] & 0x0F) * 4
            src_port, dst_port = struct.unpack("!HH", packet[ihl:ihl + 4])
            if src_port == port and dst_port == sport and packet[ihl + 13] & 0x04:
                return True
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need root")
def test_stray_packets_to_a_vip_taken_over_get_no_reset(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert _reset_for_stray_ack(port, TAKEN_OVER)  # without the filter the kernel resets
    set_vip_filter(listener, [HANDED_OFF], [TAKEN_OVER])
    assert not _reset_for_stray_ack(port, TAKEN_OVER)  # the old holder's connection lives on
    assert _reset_for_stray_ack(port, OTHER)  # other addresses as before


def test_the_filter_program_jumps_stay_inside_it() -> None:
    for handing_off, taking_over in [([], ["192.0.2.1"]), (["203.0.113.100", "203.0.113.101"], []), (["198.51.100.9"], ["198.51.100.8"])]:
        prog = vip_filter(handing_off, taking_over)
        assert prog[-2] == (0x06, 0, 0, 0xFFFFFFFF) and prog[-1] == (0x06, 0, 0, 0)  # accept, drop
        for i, (code, jt, jf, k) in enumerate(prog):
            if code == 0x05:
                assert i + 1 + k < len(prog)
            elif code & 0x07 == 0x05:  # conditional jumps
                assert i + 1 + max(jt, jf) < len(prog)


def test_vip_spec_round_trips_through_the_guard_command_line() -> None:
    vip = VipSpec("203.0.113.100", 24, "eth0")
    assert VipSpec.from_arg(vip.arg) == vip
    for bad in ("203.0.113.100/24", "203.0.113.100@eth0", "nonsense/24@eth0", "203.0.113.100/x@eth0"):
        with pytest.raises((ValueError, OSError)):
            VipSpec.from_arg(bad)


async def test_connections_accepted_while_filtered_do_not_keep_the_filter(listener: socket.socket) -> None:
    """The kernel copies a listener's filter to each connection it accepts; the accept path
    takes it off, or a VIP's quiet rule would eat that connection's ACKs and FINs for ever."""
    import trio

    from lbnode.listen import ConnectionGate, accept_pending

    port = listener.getsockname()[1]
    listener.setblocking(False)
    set_vip_filter(listener, [], [TAKEN_OVER])
    client = socket.create_connection((TAKEN_OVER, port), timeout=1)
    client.sendall(b"GET")  # completes the handshake (its bare ACK was dropped)
    got: list[bytes] = []

    async def handler(conn: socket.socket, client_ip: str) -> None:
        conn.setblocking(True)
        conn.settimeout(1)
        got.append(await trio.to_thread.run_sync(conn.recv, 3))
        got.append(await trio.to_thread.run_sync(conn.recv, 3))  # the FIN: b"" unless it was dropped

    async with trio.open_nursery() as nursery:
        await trio.sleep(0.05)
        assert await accept_pending(listener, handler, nursery, ConnectionGate(None)) == 1
        await trio.sleep(0.05)
        client.shutdown(socket.SHUT_WR)  # a bare FIN
    client.close()
    assert got == [b"GET", b""]


# IPv6: ::1 plays the VIP; the other addresses differ from it in the first or the last of its
# four words, so a match on part of the address would show.
V6_NEAR_FIRST, V6_NEAR_LAST = "1::1", "::2"


@pytest.fixture
def listener6() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as lbnode.listen.bind_tcp
    s.bind(("::1", 0))
    s.listen(16)
    yield s
    s.close()


def test_ipv6_new_connections_to_a_vip_handed_off_get_no_answer(listener6: socket.socket) -> None:
    port = listener6.getsockname()[1]
    set_vip_filter(listener6, [V6_NEAR_FIRST, V6_NEAR_LAST, "192.0.2.1"], [])  # not ours: served
    near = socket.create_connection(("::1", port), timeout=1)
    listener6.accept()[0].close()
    set_vip_filter(listener6, ["::1"], [])
    started = time.monotonic()
    with pytest.raises(TimeoutError):  # no reset: the SYN is dropped
        socket.create_connection(("::1", port), timeout=0.3)
    assert time.monotonic() - started >= 0.29
    set_vip_filter(listener6, [], ["::1"])  # taken over: a client that speaks first connects
    taken = socket.create_connection(("::1", port), timeout=1)
    taken.sendall(b"GET")
    taken_accepted, _ = listener6.accept()
    taken_accepted.settimeout(1)
    assert taken_accepted.recv(3) == b"GET"
    set_vip_filter(listener6, [])
    again = socket.create_connection(("::1", port), timeout=1)
    for s in (near, taken, taken_accepted, again):
        s.close()


def test_an_ipv4_listener_ignores_the_ipv6_vips_in_the_lists(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    set_vip_filter(listener, ["2001:db8::100", HANDED_OFF], ["2001:db8::101"])
    with pytest.raises(TimeoutError):
        socket.create_connection((HANDED_OFF, port), timeout=0.3)
    socket.create_connection((OTHER, port), timeout=1).close()


def _reset_for_stray_ack6(port: int) -> bool:
    """Send an ACK of no connection to [::1]:port; does a reset come back within 0.3 s?"""
    sport = random.randint(40000, 60000)
    loop = socket.inet_pton(socket.AF_INET6, "::1")
    header = struct.pack("!HHIIBBHHH", sport, port, random.getrandbits(32), random.getrandbits(32),
                         5 << 4, 0x10, 65535, 0, 0)
    data = loop + loop + struct.pack("!I3xB", len(header), socket.IPPROTO_TCP) + header
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    segment = header[:16] + struct.pack("!H", ~total & 0xFFFF) + header[18:]
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
        raw.settimeout(0.05)
        raw.sendto(segment, ("::1", 0))
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            try:
                packet = raw.recv(4096)  # an IPv6 raw socket gets the TCP segment, no IP header
            except TimeoutError:
                continue
            src_port, dst_port = struct.unpack("!HH", packet[:4])
            if src_port == port and dst_port == sport and packet[13] & 0x04:
                return True
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need root")
def test_ipv6_stray_packets_to_a_vip_taken_over_get_no_reset(listener6: socket.socket) -> None:
    port = listener6.getsockname()[1]
    assert _reset_for_stray_ack6(port)  # without the filter the kernel resets
    set_vip_filter(listener6, [], [V6_NEAR_FIRST, V6_NEAR_LAST])
    assert _reset_for_stray_ack6(port)  # other addresses as before
    set_vip_filter(listener6, [], ["::1"])
    assert not _reset_for_stray_ack6(port)  # the old holder's connection lives on


def test_the_filter_program_with_many_ipv6_vips_stays_inside_it() -> None:
    many = [f"2001:db8::{n:x}" for n in range(1, 41)]  # 40 moving at once: 9 instructions each
    for handing_off, taking_over in [(many, ["192.0.2.1"]), (["198.51.100.9"], many), (many[:1], many[1:2])]:
        prog = vip_filter(handing_off, taking_over)
        assert prog[-2] == (0x06, 0, 0, 0xFFFFFFFF) and prog[-1] == (0x06, 0, 0, 0)
        for i, (code, jt, jf, k) in enumerate(prog):
            if code == 0x05:
                assert i + 1 + k < len(prog)
            elif code & 0x07 == 0x05:
                assert i + 1 + max(jt, jf) < len(prog)
