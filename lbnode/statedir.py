"""One node per ``[node] state_dir``: an exclusive lock held for the life of ``lbnode run``,
and the one way files in it are written (``write_atomic``: never a half-written file).

Two nodes sharing a state_dir would overwrite each other's pools (the control API's file
store) and present the same identity to the cluster. The lock is ``flock`` on
``state_dir/lock``: the kernel releases it when the process ends, however it ends, so a
crashed node never leaves a stale lock behind. The file holds the holder's pid, for the
error message only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_FILE = "lock"


class StateDirInUse(Exception):
    """Another live process holds this state_dir."""


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Take ``state_dir`` for this process (creating it, mode 0700); keep the returned file open.

    Raises ``StateDirInUse`` naming the holder's pid when another process has it, and
    ``OSError`` when the directory cannot be created or the lock file opened.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115  (held open for the life of the node)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise StateDirInUse(
            f"[node] state_dir {state_dir.resolve()} is in use by another lbnode (pid {holder}): "
            "give each node on a host its own state_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` all or nothing, even across a power cut.

    Temp file in the same directory, fsync, rename over ``path``, fsync of the directory
    (the rename itself must reach the disk). ``mode`` 0600 by default: state_dir files
    carry cookie keys and, later, private keys. Raises ``OSError``; ``path`` is then as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask, and a leftover temp file keeps its own
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
