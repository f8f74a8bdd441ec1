"""Who may use the admin endpoint: a bearer token and client certificates (``[admin]``).

Owns reading the token file and building the endpoint's TLS context (once, at ``lbnode check``
and at start: a bad file is one line naming the key), and the per-request verdict, which is
pure. ``/healthz`` is always open: outer load balancers and orchestrators probe it without
credentials, and it tells nothing but "serving" or "draining".
"""

from __future__ import annotations

import hmac
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from lbnode.model import AdminSettings, ConfigError
from lbnode.tls.context import INTERMEDIATE_CIPHERS

# RFC 6750 2.1 b64token: what can follow "Bearer " in a header without quoting.
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
# A token shorter than this is guessable by someone who can reach the port: ask for a real one
# (`openssl rand -hex 32` gives 64 characters).
MIN_TOKEN = 16
# Paths anyone may ask (see the module docstring).
OPEN_PATHS = frozenset({b"/healthz"})


@dataclass(frozen=True, slots=True)
class AdminAccess:
    token: bytes | None = None  # None: no token asked
    tls: ssl.SSLContext | None = None  # None: plain HTTP
    client_certs: bool = False  # requests other than OPEN_PATHS need a verified client certificate


OPEN = AdminAccess()


def load_access(settings: AdminSettings) -> AdminAccess:
    """Read the files ``[admin]`` names; a ConfigError names the key and the fix."""
    if settings.open:
        return OPEN
    token = None
    if settings.token_file is not None:
        token = _read_token(settings.token_file)
    tls = None
    if settings.cert is not None:
        tls = _context(settings)
    return AdminAccess(token=token, tls=tls, client_certs=settings.client_ca is not None)


def _read_token(path: str) -> bytes:
    key = "admin.token_file"
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path}: the token must be ASCII (letters, digits, -._~+/)") from None
    except OSError as exc:
        raise ConfigError(key, f"{path}: cannot read: {exc.strerror or exc}") from None
    if not TOKEN_RE.fullmatch(text):
        raise ConfigError(key, f"{path}: the token must be one word of letters, digits and -._~+/ "
                          "(e.g. the output of `openssl rand -hex 32`)")
    if len(text) < MIN_TOKEN:
        raise ConfigError(key, f"{path}: the token has {len(text)} characters, at least {MIN_TOKEN} are needed "
                          "(e.g. `openssl rand -hex 32`)")
    return text.encode()


def _context(settings: AdminSettings) -> ssl.SSLContext:
    """The listeners' TLS profile (TLS 1.2-1.3, Mozilla intermediate ciphers) with one certificate.

    With ``client_ca`` the handshake asks for a certificate and fails on one the CA did not
    sign; a client that sends none completes it (CERT_OPTIONAL), so ``/healthz`` stays open,
    and gets 403 on everything else."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    assert settings.cert is not None and settings.key is not None  # model validation
    try:
        ctx.load_cert_chain(settings.cert, settings.key)
    except FileNotFoundError as exc:
        which = "cert" if not Path(settings.cert).exists() else "key"
        raise ConfigError(f"admin.{which}", f"{exc.filename or getattr(settings, which)}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("admin.cert", f"{settings.cert} with {settings.key}: not a PEM certificate chain and "
                          f"its private key ({exc})") from None
    if settings.client_ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        try:
            ctx.load_verify_locations(cafile=settings.client_ca)
        except FileNotFoundError:
            raise ConfigError("admin.client_ca", f"{settings.client_ca}: no such file") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("admin.client_ca", f"{settings.client_ca}: not a PEM CA bundle ({exc})") from None
    return ctx


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 401 or 403
    body: bytes
    headers: str  # more header lines, each ending in CRLF


def check(access: AdminAccess, path: bytes, authorization: bytes | None, client_cert: bool) -> Refusal | None:
    """None if the request may go on; else the answer to give. Pure.

    The token is compared in constant time (``hmac.compare_digest``): how long a refusal
    takes says nothing about how much of a guess was right."""
    if path in OPEN_PATHS:
        return None
    if access.client_certs and not client_cert:
        return Refusal(403, b"a client certificate signed by admin.client_ca is required\n", "")
    if access.token is None:
        return None
    if authorization is None:
        return Refusal(401, b"a bearer token is required (Authorization: Bearer <token>)\n",
                       'WWW-Authenticate: Bearer realm="fulcrum-admin"\r\n')
    scheme, _, given = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), access.token):
        return Refusal(401, b"invalid bearer token\n",
                       'WWW-Authenticate: Bearer realm="fulcrum-admin", error="invalid_token"\r\n')
    return None
