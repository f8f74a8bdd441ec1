"""Request keys for hashing policies: the bytes ``consistent_hash`` hashes, per ``pool.hash_key``.

Owns reading one key out of a request (client IP, a header, a cookie, the
path, a query parameter). Pure: the caller hands in the request parts; no I/O,
and a malformed request yields None (no key), never an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_plus, unquote_to_bytes


def _utf8(text: str) -> bytes:
    # surrogatepass: any str encodes, so a strange header never raises here.
    return text.encode("utf-8", "surrogatepass")


def cookie_value(cookie_header: str, name: str) -> str | None:
    """Value of cookie ``name`` in a Cookie header (``a=1; b=2``), first one wins."""
    for part in cookie_header.split(";"):
        k, sep, v = part.partition("=")
        if sep and k.strip() == name:
            v = v.strip()
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            return v
    return None


def query_value(query: str, name: str) -> bytes | None:
    """Percent-decoded value of parameter ``name`` in a raw query string, first one wins.

    ``a=1&b=x%20y`` -> ``b"x y"`` for ``b``; a parameter without ``=`` has the
    empty value; ``+`` means a space, as in HTML forms.
    """
    if query.startswith("?"):
        query = query[1:]
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        if k == name or unquote_plus(k) == name:
            return unquote_to_bytes(v.replace("+", " "))
    return None


def extract_hash_key(
    hash_key_spec: str,
    client_ip: str,
    path: str,
    query: str,
    headers: Callable[[str], str | None],
) -> bytes | None:
    """The key named by ``hash_key_spec``, or None when the request does not carry it.

    ``hash_key_spec`` is one of ``source_ip``, ``path``, ``header:NAME``,
    ``cookie:NAME``, ``query:NAME`` (validated by ``model.parse_pool``).
    ``headers(name)`` returns a header's value by its lower-case name (joined
    if repeated) or None; ``query`` is the raw query string without ``?``.
    With None the policy falls back to round robin.
    """
    kind, _, name = hash_key_spec.partition(":")
    if kind == "source_ip":
        return _utf8(client_ip) if client_ip else None
    if kind == "path":
        return _utf8(path)
    if kind == "header":
        value = headers(name.lower())
        return None if value is None else _utf8(value)
    if kind == "cookie":
        header = headers("cookie")
        if header is None:
            return None
        value = cookie_value(header, name)
        return None if value is None else _utf8(value)
    if kind == "query":
        return query_value(query, name)
    raise ValueError(
        f'hash_key "{hash_key_spec}" is not one of source_ip, path, header:NAME, cookie:NAME, query:NAME'
    )
