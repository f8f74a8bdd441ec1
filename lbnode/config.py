"""node.toml -> ``Config``.

Owns reading the file and turning every problem into one line that names the
file, the key path and the reason. The rules themselves live in ``model``.
"""

from __future__ import annotations

import dataclasses
import ssl
import tomllib
from pathlib import Path

from lbnode.admin.access import load_access
from lbnode.model import (
    CertificateFile,
    Config,
    ConfigError,
    ConfigFileError,
    ListenerTls,
    parse_config,
)
from lbnode.tls.certs import Certificate, CertificateError, load_certificate
from lbnode.tls.upstream import TlsSetupError, backend_tls


def read_config_text(path: str | Path) -> str:
    """node.toml's text; an unreadable file is one line naming it."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc}") from None


def load_config(path: str | Path, text: str | None = None) -> Config:
    """``path`` read and checked; ``text``: its content already read (a supervisor hands the
    exact text it checked to its workers, so an edit made since cannot split them)."""
    path = Path(path)
    if text is None:
        text = read_config_text(path)
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
        config = parse_config(data)
        if config.certificate_files:
            config = dataclasses.replace(
                config, certificates=tuple(read_certificate(c, i) for i, c in enumerate(config.certificate_files))
            )
        for i, li in enumerate(config.listeners):
            if li.tls is not None:
                check_listener_tls(li.tls, f"listeners[{i}].tls")
        # [admin]'s token and certificate files: read now so that a bad one is `lbnode check`'s error.
        load_access(config.admin)
    except ConfigError as exc:
        raise ConfigFileError(f"{origin}: {exc}") from None
    for i, li in enumerate(config.listeners):
        # The file is opened when the node starts; a directory that is not there is a typo
        # `lbnode check` can name now (permissions are the start's to report: check may run as another user).
        if li.access_log is not None and not li.access_log.to_stdout:
            directory = Path(li.access_log.path).parent
            if not directory.is_dir():
                raise ConfigFileError(f"{origin}: listeners[{i}].access_log.path: directory {directory} does not exist")
    # Files named by [pools.tls] are read now, so a bad one stops the start with one line
    # (pools that arrive later through the control API fail their connects, logged, instead).
    for i, pool in enumerate(config.pools):
        if pool.tls is not None:
            try:
                backend_tls(pool.tls)
            except TlsSetupError as exc:
                raise ConfigFileError(f"{origin}: pools[{i}].tls.{exc.key}: {exc.reason}") from None
    return config


def check_listener_tls(settings: ListenerTls, key: str) -> None:
    """What only OpenSSL can judge: the cipher string, the client CA file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if settings.ciphers is not None:
        try:
            ctx.set_ciphers(settings.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"{key}.ciphers", f'"{settings.ciphers}" selects no cipher OpenSSL knows') from None
    if settings.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=settings.client_ca)
        except FileNotFoundError:
            raise ConfigError(f"{key}.client_ca", f"{settings.client_ca}: no such file") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{key}.client_ca", f"{settings.client_ca}: not a PEM CA bundle ({exc})") from None


def read_certificate(spec: CertificateFile, index: int) -> Certificate:
    """Read and validate one ``[[certificates]]`` entry; a ConfigError names the key at fault."""
    key = f"certificates[{index}]"
    pems: dict[str, bytes] = {}
    for part in ("cert", "key"):
        path = Path(getattr(spec, part))
        try:
            pems[part] = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{key}.{part}", f"{path}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"{key}.{part}", f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return load_certificate(spec.name, pems["cert"], pems["key"])
    except CertificateError as exc:
        part, _, reason = str(exc).partition(": ")  # "cert: ..." / "key: ..."
        path = Path(getattr(spec, part, spec.cert))
        raise ConfigError(f"{key}.{part}", f"{path}: {reason}") from None
