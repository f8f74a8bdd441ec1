"""VIP addresses on this host's interfaces: netlink (pyroute2) and gratuitous ARP.

Owns adding and removing ``address/prefixlen`` on an interface and the RFC 5227 ARP
announcement. Light on imports (pyroute2 only when used): the VIP guard process
(``lbnode.cluster.vipguard``) loads it too, and removes addresses with ``delete_address``
(one raw rtnetlink request, no pyroute2).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VipSpec:
    """One configured VIP: ``address/prefixlen`` added on ``interface`` by whichever node holds it."""

    address: str  # "10.77.0.100": also the name of its etcd key
    prefixlen: int
    interface: str

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"

    @property
    def arg(self) -> str:
        """``address/prefixlen@interface``, as ``from_arg`` reads it (the VIP guard's command line)."""
        return f"{self}@{self.interface}"

    @classmethod
    def from_arg(cls, arg: str) -> VipSpec:
        cidr, sep, interface = arg.partition("@")
        address, slash, prefixlen = cidr.partition("/")
        if not (sep and slash and interface and prefixlen.isdigit()):
            raise ValueError(f'"{arg}" is not like "10.0.0.100/24@eth0"')
        socket.inet_aton(address)
        return cls(address, int(prefixlen), interface)


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
    address = socket.inet_aton(vip.address)

    def attribute(kind: int, data: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(data), kind) + data  # 4 bytes of IPv4: already aligned

    body = struct.pack("=BBBBI", socket.AF_INET, vip.prefixlen, 0, 0, index)
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


class NetlinkAddresses:
    """VIPs through pyroute2's IPRoute in this process's network namespace, GARP on a raw socket."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute  # type: ignore[import-untyped]  # here: nodes without VIPs never need it

        self._ipr = IPRoute()

    def _index(self, interface: str) -> int:
        found = self._ipr.link_lookup(ifname=interface)
        if not found:
            raise OSError(errno.ENODEV, f'network interface "{interface}" does not exist')
        return int(found[0])

    def add(self, vip: VipSpec) -> None:
        from pyroute2 import NetlinkError

        try:
            self._ipr.addr("add", index=self._index(vip.interface), address=vip.address, prefixlen=vip.prefixlen)
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
