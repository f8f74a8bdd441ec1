"""What the benchmark sets up: the loopback address, the paths and bodies the backends
serve, and the configs of lbnode, HAProxy and nginx (backends and balancer).

Pure: the renderers return text and never write files or start anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"  # the only address this benchmark ever talks to
SMALL_BODY = b"x" * 99 + b"\n"  # the 100-byte L7 response body
BULK_SIZE = 64 * 1024 * 1024  # the 64 MiB L4 response body
SMALL_PATH = "/small"
BULK_PATH = "/big.bin"


# The protections the "protections" section switches on, sized so that none of them
# refuses anything under the benchmark's load (50 connections from one client IP).
PROTECTIONS: dict[str, object] = {
    "health_interval": "1s",  # [pools.health] type = "http"
    "health_path": "/",
    "max_inflight": 1000,  # per backend
    "max_connections": 10000,  # per listener
    "rate": 1000000,  # [listeners.rate_limit], per client IP
    "burst": 1000000,
}


@dataclass
class Ports:
    backends: list[int]
    fulcrum_web: int
    fulcrum_bulk: int
    fulcrum_admin: int
    haproxy_web: int
    haproxy_bulk: int
    haproxy_bulk_splice: int  # informational: option splice-response (always splice)
    nginx_web: int


def fulcrum_config(
    ports: Ports,
    algorithm: str = "round_robin",
    node_id: str = "bench",
    state_dir: str | None = None,
    *,
    hash_key: str | None = None,
    weights: Sequence[int] | None = None,
    affinity_key: str | None = None,
    protections: bool = False,
    etcd: Sequence[str] = (),
    etcd_prefix: str | None = None,
    control_port: int | None = None,
    access_log: str | None = None,
    workers: int = 1,
    routes: int = 0,
) -> str:
    """node.toml for lbnode: an http listener over all backends, a tcp listener over the first.

    The keyword options change only the http side (pool and listener "web"):
    ``hash_key`` for consistent_hash, per-backend ``weights`` (cycled), cookie
    affinity sealed with ``affinity_key`` (64 hex digits), and ``protections``:
    http health checks, outlier detection, ``max_inflight`` per backend, the
    listener's ``max_connections`` and a rate limit (see ``PROTECTIONS``), all set
    so that none of them refuses anything under the benchmark's load.

    ``etcd`` (client URLs) makes the node a cluster member (``[cluster]``, pools in etcd
    under ``etcd_prefix``, seeded from these same pools); ``control_port`` adds a
    plain-text control API (``[control] insecure = true``: loopback only, bench only).
    Without them the text is exactly the standalone config. ``access_log``: a file for the
    http listener's ``[listeners.access_log]`` (JSON lines). ``routes``: that many
    ``[[listeners.routes]]`` (see ``route_tables``), the benchmark's request taking the
    one before last. ``workers``: ``[node] workers``, always written
    (1 by default: one process; a supervisor and that many worker processes when above 1).
    """
    # Always written: the default is "auto" (a worker per core), and a section that measures
    # lbnode as one process (pid, RSS, CPU of one process) must get one.
    state = f"workers = {workers}\n" + (f'state_dir = "{state_dir}"\n' if state_dir else "")
    if etcd:
        urls = ", ".join(f'"{u}"' for u in etcd)
        prefix = f'prefix = "{etcd_prefix}"\n' if etcd_prefix else ""
        state += f"\n[cluster]\netcd = [{urls}]\n{prefix}"
    if control_port is not None:
        state += f'\n[control]\nbind = "{HOST}:{control_port}"\ninsecure = true\n'
    pool_keys = f'hash_key = "{hash_key}"\n' if hash_key else ""
    backends = ""
    for i, p in enumerate(ports.backends):
        backends += f'  [[pools.backends]]\n  address = "{HOST}:{p}"\n'
        if weights:
            backends += f"  weight = {weights[i % len(weights)]}\n"
        if protections:
            backends += f"  max_inflight = {PROTECTIONS['max_inflight']}\n"
    pool_tables = ""
    listener_keys = ""
    if protections:
        pool_tables += (
            "  [pools.health]\n"
            '  type = "http"\n'
            f'  interval = "{PROTECTIONS["health_interval"]}"\n'
            f'  path = "{PROTECTIONS["health_path"]}"\n'
            "  [pools.outlier]\n"
        )
        listener_keys = (
            f"max_connections = {PROTECTIONS['max_connections']}\n"
            "  [listeners.rate_limit]\n"
            f"  rate = {PROTECTIONS['rate']}\n"
            f"  burst = {PROTECTIONS['burst']}\n"
        )
    if affinity_key:
        pool_tables += f'  [pools.affinity]\n  mode = "cookie"\n  key = "{affinity_key}"\n'
    if access_log:
        listener_keys += f'  [listeners.access_log]\n  path = "{access_log}"\n'
    if routes:
        listener_keys += route_tables(routes)
    return f"""\
[node]
id = "{node_id}"
admin = "{HOST}:{ports.fulcrum_admin}"
{state}
[[listeners]]
name = "web"
protocol = "http"
bind = "{HOST}:{ports.fulcrum_web}"
pool = "web"
{listener_keys}
[[listeners]]
name = "bulk"
protocol = "tcp"
bind = "{HOST}:{ports.fulcrum_bulk}"
pool = "bulk"

[[pools]]
name = "web"
algorithm = "{algorithm}"
{pool_keys}{backends}{pool_tables}
[[pools]]
name = "bulk"
  [[pools.backends]]
  address = "{HOST}:{ports.backends[0]}"
"""


def route_tables(n: int) -> str:
    """``n`` routes of the "web" listener, all to pool "web": a quarter each on exact hosts,
    path prefixes, path regexes and header values, none of which the benchmark's request
    (``GET /small``, Host 127.0.0.1) meets, except the one before last, ``path_prefix =
    "/small"``, which takes it; the last (a header route) comes after it. With ``n = 1``,
    that route alone."""
    if n == 1:
        return f'  [[listeners.routes]]\n  path_prefix = "{SMALL_PATH}"\n  pool = "web"\n'
    out = []
    for i in range(n - 2):
        kind = i % 4
        if kind == 0:
            cond = f'host = "h{i}.example"\n  path_prefix = "/"'
        elif kind == 1:
            cond = f'path_prefix = "/app{i}/"'
        elif kind == 2:
            cond = f'path_regex = "/svc{i}/[a-z]+/[0-9]{{1,12}}"'
        else:
            cond = f'headers = [{{name = "X-Tenant", exact = "t{i}"}}]'
        out.append(f'  [[listeners.routes]]\n  {cond}\n  pool = "web"\n')
    out.append(f'  [[listeners.routes]]\n  path_prefix = "{SMALL_PATH}"\n  pool = "web"\n')
    out.append('  [[listeners.routes]]\n  headers = [{name = "X-Tenant", exact = "last"}]\n  pool = "web"\n')
    return "".join(out)


def haproxy_config(ports: Ports, nbthread: int = 1) -> str:
    servers = "".join(f"    server b{i} {HOST}:{p}\n" for i, p in enumerate(ports.backends, 1))
    return f"""\
global
    nbthread {nbthread}
    maxconn 4096

defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend web
    mode http
    option http-keep-alive
    bind {HOST}:{ports.haproxy_web}
    default_backend web

backend web
    mode http
    option http-keep-alive
    http-reuse always
    balance roundrobin
{servers}
frontend bulk
    mode tcp
    option splice-auto
    bind {HOST}:{ports.haproxy_bulk}
    default_backend bulk

backend bulk
    mode tcp
    option splice-auto
    server b1 {HOST}:{ports.backends[0]}

# Not a target reference: splice-auto's heuristics may not splice at all, so this
# shows what HAProxy does when it always splices the response direction.
frontend bulk_splice
    mode tcp
    option splice-response
    bind {HOST}:{ports.haproxy_bulk_splice}
    default_backend bulk_splice

backend bulk_splice
    mode tcp
    option splice-response
    server b1 {HOST}:{ports.backends[0]}
"""


def _nginx_common(prefix: Path, workers: int, run_as_root: bool) -> str:
    user = "user root;\n" if run_as_root else ""
    return f"""\
{user}worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""\
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
"""


def nginx_backend_config(prefix: Path, www: Path, ports: Ports, run_as_root: bool) -> str:
    """One nginx, one worker, listening on every backend port: 100-byte replies and a 64 MiB file."""
    listens = "".join(f"        listen {HOST}:{p};\n" for p in ports.backends)
    body = SMALL_BODY.decode().rstrip("\n")
    return (
        _nginx_common(prefix, 1, run_as_root)
        + "http {\n"
        + _nginx_http_common(prefix)
        + f"""\
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    server {{
{listens}        root {www};
        location = {BULK_PATH} {{ }}
        location / {{ return 200 "{body}\\n"; }}
    }}
}}
"""
    )


def nginx_lb_config(prefix: Path, ports: Ports, run_as_root: bool) -> str:
    """nginx as an L7 balancer: one worker, upstream keep-alive, HTTP/1.1 to the backends."""
    servers = "".join(f"        server {HOST}:{p};\n" for p in ports.backends)
    return (
        _nginx_common(prefix, 1, run_as_root)
        + "http {\n"
        + _nginx_http_common(prefix)
        + f"""\
    upstream web {{
{servers}        keepalive 128;
        keepalive_requests 100000000;
    }}
    server {{
        listen {HOST}:{ports.nginx_web};
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}
}}
"""
    )
