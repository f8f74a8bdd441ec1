"""One node per ``[node] state_dir``: an exclusive lock held for the life of ``lbnode run``;
and how the stores write their files there (atomic, private).

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


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename, fsync of the
    directory), mode 0600: the stores' files hold secrets (cookie keys, private keys)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
