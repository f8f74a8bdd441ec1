"""Takes a dead node's VIPs off the interface: a small child process that outlives ``kill -9``.

The claimer starts it with the VIPs it may add and keeps a pipe to its stdin open. However
the node ends (a crash, ``SIGKILL``, the OOM killer), the pipe closes and the guard removes
those addresses at once, so a host whose lbnode died never answers for a VIP (ARP replies,
connection resets) that etcd is about to give to another node. ``SIGTERM`` (a service
manager stopping what is left of the service) does the same. Removing an address that is
not there is a no-op, so after a graceful stop, which released every VIP already, it does
nothing. It removes them with one rtnetlink request each (no pyroute2: its import alone
takes about half a second, and with heartbeats another node takes the VIP about 0.9 s
after this one died); until then the guard is a sleeping interpreter of a few MB.

    python -m lbnode.cluster.vipguard 192.0.2.100/24@eth0 2001:db8::100/64@eth0 [...]   # stdin: the node's pipe
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import IO

from lbnode.model import VipSpec


def start(vips: Sequence[VipSpec]) -> subprocess.Popen[bytes]:
    """The guard of ``vips``: it acts when the returned process's stdin is closed (by us, or by our death)."""
    return subprocess.Popen(
        [sys.executable, "-m", "lbnode.cluster.vipguard", *(v.arg for v in vips)],
        stdin=subprocess.PIPE,
        # its own session: a Ctrl-C or a signal to our process group must not end it before us
        start_new_session=True,
        close_fds=True,
    )


def stop(guard: subprocess.Popen[bytes]) -> None:
    """After a graceful stop: close the pipe (the guard checks, finds nothing, exits) and reap it."""
    if guard.stdin is not None:
        guard.stdin.close()
    try:
        guard.wait(5)
    except subprocess.TimeoutExpired:
        guard.kill()
        guard.wait()


def remove_all(vips: Sequence[VipSpec], err: IO[str]) -> int:
    """Remove every address in ``vips``; how many could not be removed (each said on ``err``)."""
    from lbnode.cluster.wire import delete_address

    failed = 0
    for vip in vips:
        try:
            delete_address(vip)
        except OSError as exc:
            failed += 1
            print(f"lbnode vip guard: could not remove {vip} from {vip.interface}: {exc}", file=err)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        vips = [VipSpec.from_arg(a) for a in args]
    except (ValueError, OSError) as exc:
        print(f"lbnode vip guard: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node handles Ctrl-C; we wait for its pipe
    signal.signal(signal.SIGTERM, _terminated)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except _Terminated:
        pass
    return 1 if remove_all(vips, sys.stderr) else 0


class _Terminated(Exception):
    pass


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


if __name__ == "__main__":
    sys.exit(main())
