"""node.toml -> ``Config``.

Owns reading the file and turning every problem into one line that names the
file, the key path and the reason. The rules themselves live in ``model``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from lbnode.model import Config, ConfigError, parse_config


class ConfigFileError(Exception):
    """A config file that cannot be used; ``str()`` is the one line to print."""


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc}") from None
    config = load_config_text(text, str(path))
    if config.cluster is not None and config.cluster.etcd_tls:
        # The files named by the config are part of it: `lbnode check` fails on an unreadable one.
        from lbnode.cluster.etcd import load_tls

        try:
            load_tls(config.cluster)
        except ConfigError as exc:
            raise ConfigFileError(f"{path}: {exc}") from None
    return config


def load_config_text(text: str, origin: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{origin}: invalid TOML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigFileError(f"{origin}: {exc}") from None
