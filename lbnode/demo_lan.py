"""The LAN of ``lbnode demo --cluster`` as root: network namespaces on one bridge, and one veth
from the root namespace into it, so that the user's shell reaches every host and the VIP.

Owns creating and always deleting the namespaces ``fdemo<pid>-*`` (``-lan`` holds the bridge
``br0``; each host has one ``eth0`` in a free /24 of 198.18.0.0/15). In the root namespace it
adds one veth (named ``fdemo<pid>``) with the LAN's ``.1`` address, and nothing else; deleting
the ``-lan`` namespace deletes that veth too.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

# RFC 2544's benchmarking range: meant for labs, so unlikely to be on a user's LAN or VPN.
DEMO_RANGE = ipaddress.ip_network("198.18.0.0/15")
NS_PREFIX = "fdemo"
ROOT_HOST = 1  # the root namespace's end of the LAN: .1
_STALE = re.compile(rf"^{NS_PREFIX}(\d+)-\S+$")


class LanError(Exception):
    """An ``ip`` command failed; ``str()`` is the one line to print."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise LanError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def demo_namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines()
            if line.startswith(NS_PREFIX)]


def delete_stale() -> list[str]:
    """Namespaces of demos that died without cleaning up (kill -9): deleted; their names."""
    stale = []
    for name in demo_namespaces():
        match = _STALE.match(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            delete_namespace(name)
            stale.append(name)
        except PermissionError:
            pass  # that pid is alive (another user's process): not ours to judge
    return stale


def delete_namespace(name: str) -> None:
    # whatever still runs in a demo namespace was started for the demo: end it by pid
    for pid in ip("netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    ip("netns", "del", name, check=False)


def free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of DEMO_RANGE that no address or route of the root namespace touches."""
    used: list[ipaddress.IPv4Network] = []
    for line in ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        fields = line.split()
        if len(fields) > 3:
            used.append(ipaddress.IPv4Interface(fields[3]).network)
    for line in ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        for token in line.split()[:2]:  # "198.18.0.0/24 dev ...", "local 127.0.0.1 dev lo ..."
            try:
                used.append(ipaddress.IPv4Network(token, strict=False))
                break
            except ValueError:
                continue
    return first_free(used)


def first_free(used: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """Pure: the first /24 of DEMO_RANGE overlapping none of ``used`` (a default route overlaps
    everything and is not counted)."""
    for subnet in DEMO_RANGE.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used if u.prefixlen > 0):
            return subnet  # type: ignore[return-value]
    raise LanError(f"no free /24 left in {DEMO_RANGE} for the demo's LAN")


@dataclass
class Lan:
    """Hosts (short name -> host number in the subnet) on one bridge; ``.1`` is the root namespace."""

    subnet: ipaddress.IPv4Network
    prefix: str = field(default_factory=lambda: f"{NS_PREFIX}{os.getpid()}")
    made: list[str] = field(default_factory=list)  # namespaces, in creation order

    def ns(self, member: str) -> str:
        return f"{self.prefix}-{member}"

    def address(self, host: int) -> str:
        return str(self.subnet.network_address + host)

    @property
    def root_link(self) -> str:
        return self.prefix  # "fdemo" + a pid: at most 12 characters, under IFNAMSIZ

    def build(self, hosts: dict[str, int]) -> None:
        """Create the bridge, the hosts and the root veth; on failure, ``delete()`` undoes the part made."""
        lan = self._add_ns("lan")
        ip("-n", lan, "link", "add", "br0", "type", "bridge")
        ip("-n", lan, "link", "set", "br0", "up")
        for member, host in hosts.items():
            ns = self._add_ns(member)
            ip("-n", lan, "link", "add", f"v-{member}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", lan, "link", "set", f"v-{member}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.address(host)}/{self.subnet.prefixlen}", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", self.root_link, "type", "veth", "peer", "name", "v-root", "netns", lan)
        ip("-n", lan, "link", "set", "v-root", "master", "br0", "up")
        ip("addr", "add", f"{self.address(ROOT_HOST)}/{self.subnet.prefixlen}", "dev", self.root_link)
        ip("link", "set", self.root_link, "up")

    def _add_ns(self, member: str) -> str:
        ip("netns", "add", self.ns(member))
        self.made.append(self.ns(member))
        return self.ns(member)

    def exec_prefix(self, member: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(member)]

    def addresses(self, member: str) -> set[str]:
        """The IPv4 addresses on ``member``'s eth0."""
        out = ip("-n", self.ns(member), "-4", "-o", "addr", "show", "dev", "eth0", check=False).stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line}

    def holders(self, address: str, members: Sequence[str]) -> list[str]:
        return [m for m in members if address in self.addresses(m)]

    def delete(self) -> None:
        """Every namespace made, and so the root veth (its peer is in ``-lan``); idempotent."""
        for name in reversed(self.made):
            delete_namespace(name)
        self.made.clear()
        ip("link", "del", self.root_link, check=False)  # gone with -lan already, unless -lan was never made
