"""VIP addresses on this host's interfaces: netlink (pyroute2), gratuitous ARP, unsolicited NA.

Owns adding and removing ``address/prefixlen`` on an interface, the RFC 5227 ARP
announcement (IPv4) and the RFC 4861 unsolicited neighbour advertisement (IPv6). Light on imports (pyroute2 only when used): the VIP guard process
(``lbnode.cluster.vipguard``) loads it too, and removes addresses with ``delete_address``
(one raw rtnetlink request, no pyroute2).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from lbnode.model import VipSpec

# rtnetlink constants (linux/rtnetlink.h, linux/netlink.h, linux/if_addr.h) for ``delete_address``
_RTM_DELADDR = 21
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLMSG_ERROR = 2
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def delete_address(vip: VipSpec) -> None:
    """Remove ``vip`` from its interface with one rtnetlink request, without pyroute2.

    For the VIP guard: importing pyroute2 takes about 0.5 s of CPU (more on a busy host),
    and with heartbeats another node takes the VIP about 0.9 s after this node died.
    Absent address or interface: nothing to do. Other failures raise OSError.
    """
    try:
        index = socket.if_nametoindex(vip.interface)
    except OSError:
        return  # no such interface: no address on it
    address = socket.inet_pton(vip.family, vip.address)

    def attribute(kind: int, data: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(data), kind) + data  # 4 or 16 bytes: already aligned

    body = struct.pack("=BBBBI", vip.family, vip.prefixlen, 0, 0, index)
    body += attribute(_IFA_LOCAL, address) + attribute(_IFA_ADDRESS, address)
    header = struct.pack("=IHHII", 16 + len(body), _RTM_DELADDR, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(2.0)
        nl.send(header + body)
        reply = nl.recv(65536)
    kind = struct.unpack_from("=H", reply, 4)[0]
    if kind == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", reply, 16)[0]
        if code and code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH, errno.ENODEV):
            raise OSError(code, f"removing {vip} from {vip.interface}: {os.strerror(code)}")


# linux/if_addr.h: add an IPv6 address without duplicate address detection. With DAD the
# address stays "tentative" (neither bound nor answered, no NA of ours would help) for
# dad_transmits x RetransTimer, 1 s by default, after every failover; and during a planned
# hand-off, where the old holder keeps the address until the new one has it (make-before-
# break), the old holder would answer our DAD probe and the kernel would mark the address
# "dadfailed" for good: the VIP would never come up here. The etcd key already guarantees one
# holder; DAD has nothing to add.
IFA_F_NODAD = 0x02


class NetlinkAddresses:
    """VIPs through pyroute2's IPRoute in this process's network namespace; GARP or NA on a raw socket."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute  # here: nodes without VIPs never need it

        self._ipr = IPRoute()

    def _index(self, interface: str) -> int:
        found = self._ipr.link_lookup(ifname=interface)
        if not found:
            raise OSError(errno.ENODEV, f'network interface "{interface}" does not exist')
        return int(found[0])

    def add(self, vip: VipSpec) -> None:
        from pyroute2 import NetlinkError

        try:
            extra = {"flags": IFA_F_NODAD} if vip.family == socket.AF_INET6 else {}
            self._ipr.addr("add", index=self._index(vip.interface), address=vip.address, prefixlen=vip.prefixlen,
                           **extra)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise OSError(exc.code, f"adding {vip} on {vip.interface}: {exc}") from None

    def remove(self, vip: VipSpec) -> None:
        from pyroute2 import NetlinkError

        try:
            self._ipr.addr("del", index=self._index(vip.interface), address=vip.address, prefixlen=vip.prefixlen)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise OSError(exc.code, f"removing {vip} from {vip.interface}: {exc}") from None
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise

    def announce(self, vip: VipSpec) -> None:
        if vip.family == socket.AF_INET6:
            send_unsolicited_na(vip.interface, vip.address)
        else:
            send_garp(vip.interface, vip.address)

    def close(self) -> None:
        self._ipr.close()


ARP_ANNOUNCE = "/proc/sys/net/ipv4/conf/{}/arp_announce"


def announce_from_primary(interface: str) -> bool:
    """Make ``interface``'s ARP requests come from its primary address, never from a VIP.

    With Linux's default (``arp_announce`` 0) a host asking for a client's MAC puts the
    packet's source address in the request: a VIP. Every neighbour that hears it points the
    VIP at this host again, so an old holder still answering during a hand-off, or asking
    just after it, takes clients back from the new one. True when it was changed; OSError
    when it cannot be (no permission, no such interface).
    """
    path = ARP_ANNOUNCE.format(interface)
    with open(path) as f:
        if int(f.read().strip() or 0) >= 2:
            return False
    with open(path, "w") as f:
        f.write("2\n")
    return True


def garp_frame(mac: bytes, address: str) -> bytes:
    """A broadcast ARP request for ``address`` from ``address`` (RFC 5227's ARP announcement)."""
    ip = socket.inet_aton(address)
    ethernet = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    return ethernet + arp


def send_garp(interface: str, address: str) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)) as s:
        s.bind((interface, 0x0806))
        mac = s.getsockname()[4]
        s.send(garp_frame(mac, address))


# RFC 4861 (neighbour discovery), RFC 2464 (IPv6 over Ethernet)
ETH_P_IPV6 = 0x86DD
ALL_NODES = "ff02::1"
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"  # 33:33 + the low 32 bits of ff02::1
ICMPV6 = 58
NA_TYPE = 136
NA_OVERRIDE = 0x20000000  # the O flag: replace the cached link-layer address (R and S stay 0)
OPTION_TARGET_LL = 2
# A receiver discards neighbour discovery with a hop limit below 255 (RFC 4861 7.1.2): proof
# that it was not forwarded from another link.
ND_HOP_LIMIT = 255


def icmpv6_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """The ICMPv6 checksum (RFC 4443 2.3): the ones' complement sum over the IPv6 pseudo-header
    (source, destination, upper-layer length, next header) and the message, checksum field 0."""
    data = src + dst + struct.pack("!I3xB", len(message), ICMPV6) + message
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def na_frame(mac: bytes, address: str) -> bytes:
    """An unsolicited neighbour advertisement for ``address`` at ``mac``, from ``address`` to all
    nodes (ff02::1), with the override flag and the target link-layer address option: every
    neighbour that has ``address`` in its cache points it at ``mac`` at once (RFC 4861 7.2.6)."""
    src = socket.inet_pton(socket.AF_INET6, address)
    dst = socket.inet_pton(socket.AF_INET6, ALL_NODES)
    option = struct.pack("!BB", OPTION_TARGET_LL, 1) + mac  # length in units of 8 bytes
    message = struct.pack("!BBHI", NA_TYPE, 0, 0, NA_OVERRIDE) + src + option
    checksum = icmpv6_checksum(src, dst, message)
    message = message[:2] + struct.pack("!H", checksum) + message[4:]
    ipv6 = struct.pack("!IHBB", 6 << 28, len(message), ICMPV6, ND_HOP_LIMIT) + src + dst
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + message


def send_unsolicited_na(interface: str, address: str) -> None:
    """The IPv6 counterpart of ``send_garp``: a whole Ethernet frame on a packet socket, so that
    the hop limit, source address and checksum are exactly ours (no kernel source selection)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IPV6)) as s:
        s.bind((interface, ETH_P_IPV6))
        mac = s.getsockname()[4]
        s.send(na_frame(mac, address))
