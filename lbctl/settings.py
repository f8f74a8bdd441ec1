"""Where lbctl connects and with which certificates: flags, then environment, then a config file.

Owns the precedence (flag > LBCTL_* variable > lbctl.toml > default) and
reading the PEM files. Never opens a connection.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ENDPOINT = "127.0.0.1:7443"
ENV_ENDPOINTS = "LBCTL_ENDPOINTS"
ENV_CA, ENV_CERT, ENV_KEY, ENV_INSECURE = "LBCTL_CA", "LBCTL_CERT", "LBCTL_KEY", "LBCTL_INSECURE"
ENV_CONFIG = "LBCTL_CONFIG"
CONFIG_KEYS = ("endpoints", "ca", "cert", "key", "insecure", "output", "timeout")


class SettingsError(Exception):
    """Unusable settings; ``str()`` is the one line to print."""


@dataclass(frozen=True, slots=True)
class Tls:
    ca: bytes
    cert: bytes | None  # None: no client certificate (the server will refuse; useful to test that)
    key: bytes | None


@dataclass(frozen=True, slots=True)
class Settings:
    endpoints: tuple[str, ...]
    tls: Tls | None  # None = plain text (--insecure)
    output: str = "table"
    timeout: float = 10.0


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fulcrum" / "lbctl.toml"


def load_config_file(path: Path | None) -> tuple[dict[str, object], Path | None]:
    """The config file's table (empty when the default file does not exist) and its path."""
    explicit = path is not None or ENV_CONFIG in os.environ
    path = path or Path(os.environ.get(ENV_CONFIG) or default_config_path())
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if explicit:
            raise SettingsError(f"{path}: no such file") from None
        return {}, None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from None
    for key in data:
        if key not in CONFIG_KEYS:
            raise SettingsError(f"{path}: {key}: unknown key (known: {', '.join(CONFIG_KEYS)})")
    return data, path


def resolve(
    *,
    endpoints: list[str] | None,
    ca: str | None,
    cert: str | None,
    key: str | None,
    insecure: bool,
    output: str | None,
    timeout: float | None,
    config_path: Path | None,
) -> Settings:
    """Flags (None/False when not given) over environment over the config file."""
    file, file_path = load_config_file(config_path)
    base = file_path.parent if file_path is not None else Path.cwd()

    def from_file(name: str) -> object:
        value = file.get(name)
        if value is not None and name in ("ca", "cert", "key"):
            if not isinstance(value, str):
                raise SettingsError(f"{file_path}: {name}: expected a file path")
            return str(base / Path(value).expanduser())  # relative to the config file
        return value

    eps: list[str] = []
    if endpoints:
        eps = [e for arg in endpoints for e in arg.split(",")]
    elif os.environ.get(ENV_ENDPOINTS):
        eps = os.environ[ENV_ENDPOINTS].split(",")
    elif file.get("endpoints") is not None:
        value = file["endpoints"]
        if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
            raise SettingsError(f'{file_path}: endpoints: expected a list like ["192.0.2.1:7443"]')
        eps = list(value)
    eps = [e.strip() for e in eps if e.strip()] or [DEFAULT_ENDPOINT]
    for e in eps:
        host, sep, port = e.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SettingsError(f'endpoint "{e}" is not HOST:PORT')

    if not insecure:
        env = os.environ.get(ENV_INSECURE, "").strip().lower()
        if env:
            insecure = env in ("1", "true", "yes", "on")
        elif file.get("insecure") is not None:
            if not isinstance(file["insecure"], bool):
                raise SettingsError(f"{file_path}: insecure: expected true or false")
            insecure = file["insecure"]

    out = output or os.environ.get("LBCTL_OUTPUT") or file.get("output") or "table"
    if out not in ("table", "json"):
        raise SettingsError(f'output "{out}" is not one of: table, json')
    wait = timeout if timeout is not None else file.get("timeout", 10.0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or wait <= 0:
        raise SettingsError(f"timeout: expected a number of seconds > 0, got {wait!r}")

    tls = None
    if not insecure:
        ca_path = ca or os.environ.get(ENV_CA) or from_file("ca")
        cert_path = cert or os.environ.get(ENV_CERT) or from_file("cert")
        key_path = key or os.environ.get(ENV_KEY) or from_file("key")
        if not ca_path:
            raise SettingsError(
                "no CA certificate: give --ca, --cert and --key (or LBCTL_CA, LBCTL_CERT, LBCTL_KEY, "
                f"or ca/cert/key in {default_config_path()}), or --insecure for a plain-text endpoint"
            )
        if bool(cert_path) != bool(key_path):
            raise SettingsError("--cert and --key go together (a client certificate and its key)")
        tls = Tls(
            ca=_read(str(ca_path), "--ca"),
            cert=_read(str(cert_path), "--cert") if cert_path else None,
            key=_read(str(key_path), "--key") if key_path else None,
        )
    return Settings(endpoints=tuple(eps), tls=tls, output=str(out), timeout=float(wait))


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise SettingsError(f"{what} {path}: {exc.strerror or exc}") from None
