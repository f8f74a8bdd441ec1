"""What a reload of node.toml changes: which listeners are added, changed, kept or removed,
which listening sockets carry over, and what a running node cannot take without a restart.

Pure: two ``Config`` in, a ``ReloadPlan`` out (or ``ReloadRefused`` naming the key); no
sockets, no clock. ``LbNode.reload`` carries the plan out; a binary upgrade (``lbnode run
--takeover``) and, later, a new generation of workers match sockets with ``socket_key``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lbnode.model import Address, Config, Listener


class ReloadRefused(Exception):
    """The new file cannot be applied to the running node; the node goes on with the old one."""


# What a running process cannot change: each is read once at start (identity, files held
# open, sockets owned by threads). ``lbnode run --takeover`` starts a new process with them.
RESTART_ONLY: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("node.id", lambda c: c.node.id),
    ("node.state_dir", lambda c: c.node.state_dir),
    ("node.admin", lambda c: c.node.admin),
    # One process or a supervisor and N workers, and how many: the process layout is chosen at start.
    ("node.workers", lambda c: c.node.workers),
    ("[admin]", lambda c: c.admin),
    ("[control]", lambda c: c.control),
    ("[cluster]", lambda c: c.cluster),
)


def socket_key(name: str, bind: Address) -> str:
    """Which listening socket a listener can take over: the one bound to the same address; for
    port 0 (tests: any free port) the one of the same listener name on that host."""
    if bind.port == 0:
        return f"{bind.host}:0/{name}"
    return str(bind)


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    added: tuple[Listener, ...]  # new sockets to bind (no socket with their address is open)
    changed: tuple[tuple[str, Listener], ...]  # (running listener, new settings): same socket, new handler
    kept: tuple[str, ...]  # the same settings: nothing to do
    removed: tuple[str, ...]  # stop accepting, finish what is in flight, close

    def summary(self) -> str:
        parts = []
        for what, names in (("added", [li.name for li in self.added]),
                            ("changed", [li.name for _, li in self.changed]),
                            ("removed", list(self.removed))):
            if names:
                parts.append(f"{what} {', '.join(names)}")
        return "listeners " + "; ".join(parts) if parts else "listeners unchanged"


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """The listener changes from ``old`` to ``new``; raises ``ReloadRefused`` for what needs a restart."""
    changed_keys = [key for key, read in RESTART_ONLY if read(old) != read(new)]
    if changed_keys:
        raise ReloadRefused(
            f"{', '.join(changed_keys)} changed: a running node cannot take that without a restart "
            "(lbnode run --takeover starts a new process that takes over the sockets)"
        )
    running = {socket_key(li.name, li.bind): li for li in old.listeners}
    added: list[Listener] = []
    changed: list[tuple[str, Listener]] = []
    kept: list[str] = []
    taken: set[str] = set()
    for i, li in enumerate(new.listeners):
        before = running.get(socket_key(li.name, li.bind))
        if before is None:
            if li.access_log is not None:
                raise ReloadRefused(f"listeners[{i}].access_log: a new listener's access log needs a restart "
                                    "(lbnode run --takeover)")
            added.append(li)
            continue
        taken.add(before.name)
        if before.access_log != li.access_log:
            raise ReloadRefused(f"listeners[{i}].access_log changed: access log files are opened at start "
                                "(lbnode run --takeover)")
        if before == li:
            kept.append(li.name)
        else:
            changed.append((before.name, li))
    removed = tuple(li.name for li in old.listeners if li.name not in taken)
    return ReloadPlan(tuple(added), tuple(changed), tuple(kept), removed)
