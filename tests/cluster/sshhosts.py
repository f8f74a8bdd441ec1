"""Namespace hosts reachable over SSH: one ``sshd`` per node namespace, a key pair made by the test.

Owns the keys (a host key and a client key, ed25519, made with ``ssh-keygen`` in the test's
tmp dir), each sshd's config (listening only on its host's address, port 22; root by key only),
starting sshd through ``Lan.spawn`` (so the LAN's teardown ends it and every session it
forked), waiting until a login works, and the client options a controller (ansible, ssh) uses.
Never reads or writes ``/etc/ssh`` or ``~/.ssh``; the only thing made outside tmp is sshd's
privilege-separation dir ``/run/sshd`` (left in place: sshd needs it, it holds nothing).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.topology import Lan

SSHD = "/usr/sbin/sshd"
# sshd refuses to start without it ("Missing privilege separation directory").
PRIVSEP_DIR = Path("/run/sshd")
# How long sshd may take to accept a login after it was started.
READY_TIMEOUT = 15.0


def sshd_unavailable() -> str | None:
    """Why SSH hosts cannot be made here, or None."""
    if not Path(SSHD).exists():
        return f"{SSHD} is missing (Debian package openssh-server; `make sysdeps-test` installs it)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package openssh-client)"
    return None


@dataclass(frozen=True)
class SshKeys:
    """The keys of one test: every sshd uses ``host_key`` and accepts ``client_key``."""

    dir: Path

    @property
    def host_key(self) -> Path:
        return self.dir / "host_ed25519"

    @property
    def client_key(self) -> Path:
        return self.dir / "client_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"


def make_keys(directory: Path) -> SshKeys:
    directory.mkdir(parents=True, exist_ok=True)
    keys = SshKeys(directory)
    for key in (keys.host_key, keys.client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)],
                       check=True, capture_output=True, timeout=30)
    keys.authorized_keys.write_text(keys.client_key.with_suffix(".pub").read_text())
    keys.authorized_keys.chmod(0o600)
    return keys


def sshd_config(address: str, keys: SshKeys) -> str:
    return "\n".join([
        f"ListenAddress {address}:22",
        f"HostKey {keys.host_key}",
        f"AuthorizedKeysFile {keys.authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        # the keys live in the test's tmp dir, not in a home directory sshd would vet
        "StrictModes no",
        "PidFile none",
        "UseDNS no",
        "PrintMotd no",
        # The hosts share this machine's /root: bash started by sshd sources /root/.bashrc before
        # every command (ansible runs several per task), whatever it holds; a bash that believes
        # it is nested (SHLVL set) does not: each step took ~80 ms more with one .bashrc (pyenv).
        "SetEnv SHLVL=1",
        # ansible copies files with sftp; in-process, no sftp-server binary needed
        "Subsystem sftp internal-sftp",
        "LogLevel ERROR",
        "",
    ])


def start_sshd(lan: Lan, member: str, keys: SshKeys, log_dir: Path) -> None:
    """Run sshd in ``member``'s namespace, on its LAN address only, in the foreground (-D)."""
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    config = log_dir / f"sshd-{member}.conf"
    config.write_text(sshd_config(lan.members[member], keys))
    lan.spawn(member, [SSHD, "-D", "-e", "-f", str(config)], log_path=log_dir / f"sshd-{member}.log")


def client_options(keys: SshKeys) -> list[str]:
    """ssh options for a throwaway controller: this test's key only, no known_hosts, no ssh_config."""
    return [
        "-F", "none",
        "-o", "IdentitiesOnly=yes",
        "-o", f"IdentityFile={keys.client_key}",
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=5",
    ]


def wait_ready(lan: Lan, client: str, member: str, keys: SshKeys, log_dir: Path) -> None:
    """Until ``ssh root@<member> true`` from ``client``'s namespace succeeds."""
    address = lan.members[member]
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        done = lan.run(client, ["ssh", *client_options(keys), "-o", "BatchMode=yes", f"root@{address}", "true"],
                       timeout=READY_TIMEOUT)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            log = log_dir / f"sshd-{member}.log"
            raise AssertionError(f"ssh root@{address} (from {client}) never worked: {done.stderr.strip()}\n"
                                 f"--- {log.name}\n{log.read_text(errors='replace')[-2000:] if log.exists() else ''}")
        time.sleep(0.2)
