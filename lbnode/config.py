"""node.toml -> ``Config``.

Owns reading the file and turning every problem into one line that names the
file, the key path and the reason. The rules themselves live in ``model``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from lbnode.model import Config, ConfigError, parse_config
from lbnode.tls.upstream import TlsSetupError, backend_tls


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
    return load_config_text(text, str(path))


def load_config_text(text: str, origin: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{origin}: invalid TOML: {exc}") from None
    try:
        config = parse_config(data)
    except ConfigError as exc:
        raise ConfigFileError(f"{origin}: {exc}") from None
    # Files named by [pools.tls] are read now, so a bad one stops the start with one line
    # (pools that arrive later through the control API fail their connects, logged, instead).
    for i, pool in enumerate(config.pools):
        if pool.tls is not None:
            try:
                backend_tls(pool.tls)
            except TlsSetupError as exc:
                raise ConfigFileError(f"{origin}: pools[{i}].tls.{exc.key}: {exc.reason}") from None
    return config
