"""What /proc tells about the processes a run started: CPU time of a process tree,
the members of a process group, the ports a process listens on.

Read-only; the parsers (``parse_proc_stat``, ``parse_proc_net_tcp_listeners``) are pure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcTimes:
    ppid: int
    pgrp: int
    utime: int  # clock ticks
    stime: int
    cutime: int  # reaped children
    cstime: int

    @property
    def user(self) -> int:
        return self.utime + self.cutime

    @property
    def system(self) -> int:
        return self.stime + self.cstime


def parse_proc_stat(text: str) -> ProcTimes:
    """Fields of ``/proc/PID/stat``. The command name may contain spaces and ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    return ProcTimes(
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        cutime=int(rest[13]),
        cstime=int(rest[14]),
    )


def _read_stat(pid: int) -> ProcTimes | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_proc_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def _all_stats() -> dict[int, ProcTimes]:
    stats: dict[int, ProcTimes] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _read_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    return stats


def process_group(pgid: int) -> list[int]:
    """Live members of process group ``pgid``."""
    return [pid for pid, st in _all_stats().items() if st.pgrp == pgid]


def process_tree(root: int) -> dict[int, ProcTimes]:
    """``root`` and all its live descendants, with their CPU times."""
    stats = _all_stats()
    if root not in stats:
        return {}
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    out: dict[int, ProcTimes] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        out[pid] = stats[pid]
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_split(roots: Iterable[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the process trees under ``roots`` (all threads, plus
    children they have reaped). The kernel charges each clock tick whole to the mode it
    interrupted, so the split is a sample of the ticks (at 100 a second: coarse in short runs)."""
    user = system = 0
    for root in roots:
        for st in process_tree(root).values():
            user += st.user
            system += st.system
    return user / CLK_TCK, system / CLK_TCK


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """User+system CPU seconds of the process trees under ``roots`` (all threads,
    plus children they have reaped)."""
    return sum(tree_cpu_split(roots))


def parse_proc_net_tcp_listeners(text: str) -> dict[int, int]:
    """``/proc/net/tcp`` -> {port: socket inode} of the sockets listening on 127.0.0.1
    or 0.0.0.0."""
    out: dict[int, int] = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10 or f[3] != "0A":  # 0A = TCP_LISTEN
            continue
        addr, _, port = f[1].partition(":")
        if addr in ("0100007F", "00000000"):
            out[int(port, 16)] = int(f[9])
    return out


def listening_ports_of(pids: Iterable[int]) -> set[int]:
    """The ports on 127.0.0.1/0.0.0.0 that a socket held by one of ``pids`` listens on."""
    try:
        by_inode = {
            ino: port
            for port, ino in parse_proc_net_tcp_listeners(Path("/proc/net/tcp").read_text()).items()
        }
    except OSError:
        return set()
    found: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                port = by_inode.get(int(target[8:-1]))
                if port is not None:
                    found.add(port)
    return found
