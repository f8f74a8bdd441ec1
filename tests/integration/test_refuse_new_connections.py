"""A listener that refuses new connections to some addresses while a VIP moves (SO_ATTACH_FILTER).

Loopback only: 127.0.0.1 plays the VIP being handed off, 127.0.0.2 another address.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from lbnode.cluster.wire import VipSpec
from lbnode.listen import refuse_new_connections, syn_filter


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(16)
    yield s
    s.close()


def test_new_connections_to_a_refused_address_get_no_answer_and_the_rest_are_served(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    before = socket.create_connection(("127.0.0.1", port), timeout=1)
    accepted, _ = listener.accept()
    refuse_new_connections(listener, ["127.0.0.1"])
    started = time.monotonic()
    with pytest.raises(TimeoutError):  # no RST: the SYN is dropped, a client would send it again
        socket.create_connection(("127.0.0.1", port), timeout=0.3)
    assert time.monotonic() - started >= 0.29
    other = socket.create_connection(("127.0.0.2", port), timeout=1)  # another address: served
    before.sendall(b"x")  # a connection accepted before: untouched
    assert accepted.recv(1) == b"x"
    refuse_new_connections(listener, [])  # the hand-off is over: everyone again
    again = socket.create_connection(("127.0.0.1", port), timeout=1)
    for s in (before, accepted, other, again):
        s.close()


def test_the_filter_program_passes_everything_but_bare_syns_to_the_addresses() -> None:
    prog = syn_filter(["10.0.0.100", "10.0.0.101"])
    assert len(prog) == 7 + 2 + 2
    assert prog[-2][0] == prog[-1][0] == 0x06 and prog[-2][3] == 0xFFFFFFFF and prog[-1][3] == 0  # accept, drop
    for i, (code, jt, jf, _) in enumerate(prog):  # every jump lands inside the program
        if code == 0x15:
            assert i + 1 + max(jt, jf) < len(prog)
    assert [k for code, _, _, k in prog[7:9]] == [0x0A000064, 0x0A000065]


def test_vip_spec_round_trips_through_the_guard_command_line() -> None:
    vip = VipSpec("10.0.0.100", 24, "eth0")
    assert VipSpec.from_arg(vip.arg) == vip
    for bad in ("10.0.0.100/24", "10.0.0.100@eth0", "nonsense/24@eth0", "10.0.0.100/x@eth0"):
        with pytest.raises((ValueError, OSError)):
            VipSpec.from_arg(bad)
