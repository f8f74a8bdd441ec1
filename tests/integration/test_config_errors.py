"""``lbnode check`` / ``lbnode run`` with broken config files, as an operator sees them.

Every mistake must come out as exactly one line on stderr,
``lbnode: <file>: <key path>: <reason>``, with exit status 1 and no traceback.
Real subprocesses, real files, real sockets (for a port already in use).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

# A valid node.toml; each case below changes one thing in it (plain text replace).
VALID = """\
[node]
id = "n1"
admin = "127.0.0.1:0"
drain_timeout = "5s"
workers = 1

[[pools]]
name = "web"
algorithm = "round_robin"
maglev_table_size = 65537
  [[pools.backends]]
  address = "127.0.0.1:9001"
  [[pools.backends]]
  address = "127.0.0.1:9002"
  weight = 2

[[pools]]
name = "api"
  [[pools.backends]]
  address = "127.0.0.1:9003"

[[listeners]]
name = "web"
protocol = "http"
bind = "127.0.0.1:0"
pool = "web"
  [[listeners.routes]]
  path_prefix = "/api/"
  pool = "api"
"""

SECOND_LISTENER = """
[[listeners]]
name = "{name}"
protocol = "http"
bind = "{bind}"
pool = "web"
"""

AFFINITY = """
[pools.affinity]
mode = "cookie"
key = "{key}"
"""


def _marker(text: str, old: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once in the base config"
    return old


@dataclass(frozen=True)
class Case:
    id: str
    edits: tuple[tuple[str, str], ...]  # (old, new) text replacements on VALID
    key: str  # the key path the message must name
    reason: str  # the exact reason text after the key path
    append: str = ""  # text added at the end

    def render(self) -> str:
        text = VALID
        for old, new in self.edits:
            text = text.replace(_marker(text, old), new)
        return text + self.append


W1 = '  address = "127.0.0.1:9002"\n  weight = 2\n'  # pools[0].backends[1]
GRPC_HEALTH = '  [pools.health]\n  type = "grpc"\n  service = "shop.Cart"\n'
ALGOS = "random, round_robin, weighted_round_robin, least_connections, least_loaded, least_latency, source_hash, consistent_hash"

CASES = [
    Case(
        "connect-ejection-negative",
        (('algorithm = "round_robin"\n', 'algorithm = "round_robin"\nconnect_ejection = -1\n'),),
        "pools[0].connect_ejection",
        "duration must be a finite number >= 0, got -1",
    ),
    Case(
        "connect-ejection-too-long",
        (('algorithm = "round_robin"\n', 'algorithm = "round_robin"\nconnect_ejection = "10m"\n'),),
        "pools[0].connect_ejection",
        "must be at most 300s, got '10m' (for longer outages use [pools.health] or [pools.outlier])",
    ),
    Case("unknown-top-key", (("[node]\n", 'colour = "blue"\n[node]\n'),), "colour", "unknown key"),
    Case(
        "unknown-node-key",
        (('drain_timeout = "5s"\n', 'drain_timout = "5s"\n'),),
        "node.drain_timout",
        "unknown key",
    ),
    Case(
        "unknown-listener-key",
        (
            (
                'pool = "web"\n  [[listeners.routes]]',
                'pool = "web"\nmax_conections = 10\n  [[listeners.routes]]',
            ),
        ),
        "listeners[0].max_conections",
        "unknown key",
    ),
    Case(
        "unknown-route-key",
        (('  path_prefix = "/api/"\n', '  path_prefx = "/api/"\n'),),
        "listeners[0].routes[0].path_prefx",
        "unknown key",
    ),
    Case(
        "unknown-pool-key",
        (('algorithm = "round_robin"\n', 'algoritm = "random"\n'),),
        "pools[0].algoritm",
        "unknown key",
    ),
    Case(
        "unknown-backend-key",
        ((W1, W1 + '  adress = "127.0.0.1:9004"\n'),),
        "pools[0].backends[1].adress",
        "unknown key",
    ),
    Case("missing-required-key", (('[node]\nid = "n1"\n', "[node]\n"),), "node.id", "is required"),
    Case(
        "bad-address",
        (('address = "127.0.0.1:9003"', 'address = "x"'),),
        "pools[1].backends[0].address",
        '"x" is not host:port',
    ),
    Case(
        "bad-ipv4",
        (('address = "127.0.0.1:9003"', 'address = "127.0.0.300:80"'),),
        "pools[1].backends[0].address",
        '"127.0.0.300:80": "127.0.0.300" is not an IPv4 address',
    ),
    Case(
        "backend-port-out-of-range",
        (('address = "127.0.0.1:9001"', 'address = "127.0.0.1:70000"'),),
        "pools[0].backends[0].address",
        '"127.0.0.1:70000": port 70000 is out of range 1-65535',
    ),
    Case(
        "backend-port-zero",
        (('address = "127.0.0.1:9001"', 'address = "127.0.0.1:0"'),),
        "pools[0].backends[0].address",
        '"127.0.0.1:0": port 0 is out of range 1-65535',
    ),
    Case(
        "bind-port-out-of-range",
        (('bind = "127.0.0.1:0"', 'bind = "127.0.0.1:65536"'),),
        "listeners[0].bind",
        '"127.0.0.1:65536": port 65536 is out of range 1-65535',
    ),
    Case(
        "listener-missing-pool",
        (('bind = "127.0.0.1:0"\npool = "web"', 'bind = "127.0.0.1:0"\npool = "nope"'),),
        "listeners[0].pool",
        'pool "nope" is not defined',
    ),
    Case(
        "route-missing-pool",
        (('  pool = "api"', '  pool = "nope"'),),
        "listeners[0].routes[0].pool",
        'pool "nope" is not defined',
    ),
    Case(
        "route-regex-backtracks",
        (('  path_prefix = "/api/"\n', '  path_regex = "/api/(\\\\w+/?)*"\n'),),
        "listeners[0].routes[0].path_regex",
        '"/api/(\\w+/?)*" repeats a repetition (like (a+)+), which can take exponential time',
    ),
    Case(
        "route-split-missing-pool",
        (('  pool = "api"', '  split = [{pool = "api", weight = 95}, {pool = "nope", weight = 5}]'),),
        "listeners[0].routes[0].split[1].pool",
        'pool "nope" is not defined',
    ),
    Case(
        "duplicate-pool-name",
        (('name = "api"', 'name = "web"'),),
        "pools[1].name",
        '"web" is already used by pools[0]',
    ),
    Case(
        "duplicate-listener-name",
        (),
        "listeners[1].name",
        '"web" is already used by listeners[0]',
        append=SECOND_LISTENER.format(name="web", bind="127.0.0.1:0"),
    ),
    Case(
        "duplicate-bind",
        (('bind = "127.0.0.1:0"', 'bind = "127.0.0.1:8080"'),),
        "listeners[1].bind",
        "127.0.0.1:8080 is already used by listeners[0]",
        append=SECOND_LISTENER.format(name="web2", bind="127.0.0.1:8080"),
    ),
    Case(
        "admin-on-listener-bind",
        (
            ('admin = "127.0.0.1:0"', 'admin = "127.0.0.1:8080"'),
            ('bind = "127.0.0.1:0"', 'bind = "127.0.0.1:8080"'),
        ),
        "node.admin",
        "127.0.0.1:8080 is already used by a listener",
    ),
    Case(
        "bad-algorithm",
        (('algorithm = "round_robin"', 'algorithm = "fastest"'),),
        "pools[0].algorithm",
        f'"fastest" is not one of: {ALGOS}',
    ),
    Case(
        "bad-protocol",
        (('protocol = "http"', 'protocol = "udp"'),),
        "listeners[0].protocol",
        '"udp" is not one of: http, tcp, https, tls',
    ),
    Case(
        "weight-negative",
        (("weight = 2", "weight = -1"),),
        "pools[0].backends[1].weight",
        "must be >= 0, got -1",
    ),
    Case(
        "weight-too-big",
        (("weight = 2", "weight = 1001"),),
        "pools[0].backends[1].weight",
        "must be <= 1000, got 1001",
    ),
    Case(
        "weight-wrong-type",
        (("weight = 2", 'weight = "2"'),),
        "pools[0].backends[1].weight",
        "expected an integer, got a string",
    ),
    Case(
        "weight-float",
        (("weight = 2", "weight = 2.5"),),
        "pools[0].backends[1].weight",
        "expected an integer, got a number",
    ),
    Case(
        "bad-duration",
        (('drain_timeout = "5s"', 'drain_timeout = "5 parsecs"'),),
        "node.drain_timeout",
        '"5 parsecs" is not a duration (e.g. 5, "250ms", "1.5s", "2m")',
    ),
    Case(
        "negative-duration",
        (('drain_timeout = "5s"', "drain_timeout = -1"),),
        "node.drain_timeout",
        "duration must be a finite number >= 0, got -1",
    ),
    Case(
        "node-max-connections-zero",
        (('drain_timeout = "5s"', 'drain_timeout = "5s"\nmax_connections = 0'),),
        "node.max_connections",
        "must be >= 1, got 0",
    ),
    Case(
        "node-max-connections-text",
        (('drain_timeout = "5s"', 'drain_timeout = "5s"\nmax_connections = "many"'),),
        "node.max_connections",
        "expected an integer, got a string",
    ),
    Case(
        "affinity-key-short",
        ((W1, W1 + AFFINITY.format(key="abcd")),),
        "pools[0].affinity.key",
        "must be 64 hex digits (a 32-byte key), got 4",
    ),
    Case(
        "affinity-key-not-hex",
        ((W1, W1 + AFFINITY.format(key="zz" * 32)),),
        "pools[0].affinity.key",
        "must be 64 hex digits (a 32-byte key)",
    ),
    Case(
        "maglev-not-prime",
        (("maglev_table_size = 65537", "maglev_table_size = 65536"),),
        "pools[0].maglev_table_size",
        "must be a prime number, got 65536",
    ),
    Case(
        "access-log-format",
        (('pool = "web"\n  [[listeners.routes]]', 'pool = "web"\n  [listeners.access_log]\n  path = "-"\n  format = "clf"\n  [[listeners.routes]]'),),
        "listeners[0].access_log.format",
        '"clf" is not one of: json, combined',
    ),
    Case(
        "access-log-path-missing",
        (('pool = "web"\n  [[listeners.routes]]', 'pool = "web"\n  [listeners.access_log]\n  format = "json"\n  [[listeners.routes]]'),),
        "listeners[0].access_log.path",
        "is required",
    ),
    Case(
        "access-log-unknown-key",
        (('pool = "web"\n  [[listeners.routes]]', 'pool = "web"\n  [listeners.access_log]\n  path = "-"\n  fromat = "json"\n  [[listeners.routes]]'),),
        "listeners[0].access_log.fromat",
        "unknown key",
    ),
    Case(
        "access-log-buffer-zero",
        (('pool = "web"\n  [[listeners.routes]]', 'pool = "web"\n  [listeners.access_log]\n  path = "-"\n  buffer = 0\n  [[listeners.routes]]'),),
        "listeners[0].access_log.buffer",
        "must be >= 1, got 0",
    ),
    Case(
        "access-log-combined-on-tcp",
        (('  [[listeners.routes]]\n  path_prefix = "/api/"\n  pool = "api"\n', '  [listeners.access_log]\n  path = "-"\n  format = "combined"\n'),
         ('protocol = "http"', 'protocol = "tcp"')),
        "listeners[0].access_log.format",
        'combined is for protocol = "http" or "https" listeners (an L4 connection has no request line): use "json"',
    ),
    Case(
        "request-id-on-tcp",
        (('  [[listeners.routes]]\n  path_prefix = "/api/"\n  pool = "api"\n', 'request_id = true\n'), ('protocol = "http"', 'protocol = "tcp"')),
        "listeners[0].request_id",
        'is an HTTP header: only for protocol = "http" or "https"',
    ),
    Case(
        "access-log-directory-missing",
        (('pool = "web"\n  [[listeners.routes]]', 'pool = "web"\n  [listeners.access_log]\n  path = "no/such/dir/access.log"\n  [[listeners.routes]]'),),
        "listeners[0].access_log.path",
        "directory no/such/dir does not exist",
    ),
    Case(
        "request-id-not-bool",
        (('pool = "web"\n  [[listeners.routes]]', 'pool = "web"\nrequest_id = "yes"\n  [[listeners.routes]]'),),
        "listeners[0].request_id",
        "expected true or false, got a string",
    ),
    Case(
        "routes-on-tcp",
        (('protocol = "http"', 'protocol = "tcp"'),),
        "listeners[0].routes[0]",
        'routes need protocol = "http" or "https"',
    ),
    Case(
        "grpc-health-unknown-key",
        ((W1, W1 + GRPC_HEALTH + '  servise = "shop.Cart"\n'),),
        "pools[0].health.servise",
        "unknown key",
    ),
    Case(
        "health-service-without-grpc",
        ((W1, W1 + '  [pools.health]\n  type = "http"\n  service = "shop.Cart"\n'),),
        "pools[0].health.service",
        'is for type = "grpc" checks, not "http"',
    ),
    Case(
        "health-service-default-type",
        ((W1, W1 + '  [pools.health]\n  service = "shop.Cart"\n'),),
        "pools[0].health.service",
        'is for type = "grpc" checks, not "tcp"',
    ),
    Case(
        "grpc-health-with-path",
        ((W1, W1 + GRPC_HEALTH + '  path = "/healthz"\n'),),
        "pools[0].health.path",
        'is for type = "http" checks; a grpc check asks grpc.health.v1 (choose the service with service = ...)',
    ),
    Case(
        "grpc-health-with-send-proxy",
        (('algorithm = "round_robin"\n', 'algorithm = "round_robin"\nsend_proxy = "v2"\n'), (W1, W1 + GRPC_HEALTH)),
        "pools[0].send_proxy",
        'cannot be used with [pools.health] type = "grpc": grpcio opens the check\'s connections itself and '
        "cannot send a PROXY header before HTTP/2 (use a tcp or http check here)",
    ),
    Case(
        "grpc-health-without-verify",
        ((W1, W1 + GRPC_HEALTH + "  [pools.tls]\n  verify = false\n"),),
        "pools[0].tls.verify",
        'false cannot be used with [pools.health] type = "grpc": grpcio always verifies the backend\'s '
        "certificate (give the backends' CA in ca instead, or use a tcp or http check)",
    ),
]

TIMEOUT = 30  # seconds for any one lbnode invocation (startup is ~0.5 s; CI may be slow)


def lbnode(*args: str, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbnode.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit 1; stderr is exactly ``expected`` plus a newline; nothing on stdout."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), (
        f"not one line: {result.stderr!r}"
    )
    assert result.stderr == expected + "\n"
    assert result.stdout == ""


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_config_is_valid(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = lbnode("check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == f"{path}: ok (node n1, 1 listeners, 2 pools, 3 backends, 1 workers)\n"


def test_example_and_relative_path(tmp_path: Path) -> None:
    """A relative --config path is named as given."""
    write(tmp_path, VALID.replace('address = "127.0.0.1:9003"', 'address = "x"'), "bad.toml")
    result = lbnode("check", "--config", "bad.toml", cwd=tmp_path)
    assert_one_line_error(
        result, 'lbnode: bad.toml: pools[1].backends[0].address: "x" is not host:port'
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_check_reports_one_line(tmp_path: Path, case: Case) -> None:
    path = write(tmp_path, case.render())
    result = lbnode("check", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(result, f"lbnode: {path}: {case.key}: {case.reason}")


WHOLE_FILES = [
    ("empty-file", "", "node", "is required"),
    (
        "pools-not-array",
        'pools = 3\n[node]\nid = "n1"\n',
        "pools",
        "expected a list of tables ([[pools]]), got an integer",
    ),
    ("node-not-table", 'node = "n1"\n', "node", "expected a table, got a string"),
    (
        "bad-node-id",
        '[node]\nid = "bad name"\n',
        "node.id",
        '"bad name" is not a valid name (letters, digits, "_", "-", "."; at most 63)',
    ),
    (
        "duplicate-backend",
        '[node]\nid = "n1"\n[[pools]]\nname = "p"\n'
        'backends = [{address = "127.0.0.1:1"}, {address = "127.0.0.1:1"}]\n',
        "pools[0].backends[1]",
        'backend "127.0.0.1:1" appears twice (also pools[0].backends[0])',
    ),
    (
        "admin-port-out-of-range",
        '[node]\nid = "n1"\nadmin = "localhost:99999"\n',
        "node.admin",
        '"localhost:99999": port 99999 is out of range 1-65535',
    ),
    (
        "infinite-duration",
        '[node]\nid = "n1"\ndrain_timeout = inf\n',
        "node.drain_timeout",
        "duration must be a finite number >= 0, got inf",
    ),
]


@pytest.mark.parametrize(
    "text, key, reason", [c[1:] for c in WHOLE_FILES], ids=[c[0] for c in WHOLE_FILES]
)
def test_check_whole_file(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    result = lbnode("check", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(result, f"lbnode: {path}: {key}: {reason}")


def test_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = lbnode("check", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(result, f"lbnode: {path}: no such file")


@pytest.mark.parametrize(
    "text, where",
    [
        ('[node]\nid = "n1\n', "line 2"),  # unterminated string
        ('[node]\nid = "n1"\n[node]\nid = "n2"\n', "line 3"),  # table defined twice
        ("[node\n", "line 1"),
        ('[node]\nid = "n1"\nid = "n2"\n', "line 3"),  # key defined twice
    ],
    ids=["unterminated-string", "duplicate-table", "bad-header", "duplicate-key"],
)
def test_check_invalid_toml(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    result = lbnode("check", "--config", str(path), cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"lbnode: {path}: invalid TOML: "), result.stderr
    assert where in result.stderr


def test_check_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b'[node]\nid = "\xff\xfe"\n')
    result = lbnode("check", "--config", str(path), cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"lbnode: {path}: cannot read: "), result.stderr


def test_check_directory_instead_of_file(tmp_path: Path) -> None:
    result = lbnode("check", "--config", str(tmp_path), cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"lbnode: {tmp_path}: "), result.stderr


# --------------------------------------------------------------------------- lbnode run


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c.id in ("bad-address", "unknown-backend-key", "bad-duration", "listener-missing-pool")
    ],
    ids=lambda c: c.id,
)
def test_run_reports_config_errors_like_check(tmp_path: Path, case: Case) -> None:
    path = write(tmp_path, case.render())
    result = lbnode("run", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(result, f"lbnode: {path}: {case.key}: {case.reason}")


def test_run_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = lbnode("run", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(result, f"lbnode: {path}: no such file")


def test_run_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[node\n")
    result = lbnode("run", "--config", str(path), cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"lbnode: {path}: invalid TOML: ")


def _busy_port() -> socket.socket:
    """A listening socket on a free loopback port (the caller closes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("protocol", ["http", "tcp"])
def test_run_listener_port_in_use(tmp_path: Path, protocol: str) -> None:
    busy = _busy_port()
    try:
        port = busy.getsockname()[1]
        text = VALID.replace('bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{port}"')
        if protocol == "tcp":
            text = text[: text.index("  [[listeners.routes]]")].replace(
                'protocol = "http"', 'protocol = "tcp"'
            )
        path = write(tmp_path, text)
        start = time.monotonic()
        result = lbnode("run", "--config", str(path), cwd=tmp_path, timeout=15)
        elapsed = time.monotonic() - start
    finally:
        busy.close()
    assert elapsed < 10, f"took {elapsed:.1f}s to report a busy port"
    assert_one_line_error(
        result,
        f"lbnode: {path}: listener web: cannot listen on 127.0.0.1:{port}: address already in use",
    )


def test_run_admin_port_in_use(tmp_path: Path) -> None:
    busy = _busy_port()
    try:
        port = busy.getsockname()[1]
        listen_port = free_port()
        text = VALID.replace('admin = "127.0.0.1:0"', f'admin = "127.0.0.1:{port}"').replace(
            'bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{listen_port}"'
        )
        path = write(tmp_path, text)
        result = lbnode("run", "--config", str(path), cwd=tmp_path, timeout=15)
    finally:
        busy.close()
    assert_one_line_error(
        result,
        f"lbnode: {path}: node.admin: cannot listen on 127.0.0.1:{port}: address already in use",
    )


def test_run_second_listener_port_in_use(tmp_path: Path) -> None:
    """The first listener binds fine, the second cannot: still one line, nothing left listening."""
    busy = _busy_port()
    first = free_port()
    try:
        port = busy.getsockname()[1]
        text = VALID.replace(
            'bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{first}"'
        ) + SECOND_LISTENER.format(name="second", bind=f"127.0.0.1:{port}")
        path = write(tmp_path, text)
        result = lbnode("run", "--config", str(path), cwd=tmp_path, timeout=15)
    finally:
        busy.close()
    assert_one_line_error(
        result,
        f"lbnode: {path}: listener second: cannot listen on 127.0.0.1:{port}: address already in use",
    )
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", first), timeout=1).close()


def test_run_access_log_not_openable(tmp_path: Path) -> None:
    """A path the node cannot open (here a directory) stops the start with one line naming the key."""
    (tmp_path / "logs").mkdir()
    text = VALID.replace('pool = "web"\n  [[listeners.routes]]',
                         'pool = "web"\n  [listeners.access_log]\n  path = "logs"\n  [[listeners.routes]]')
    path = write(tmp_path, text)
    assert lbnode("check", "--config", str(path), cwd=tmp_path).returncode == 0  # check does not open it
    result = lbnode("run", "--config", str(path), cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"lbnode: {path}: listeners[0].access_log.path: cannot open {tmp_path / 'logs'}: Is a directory")


def test_run_bind_address_not_local(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET-1) is on no interface: the OS reason, still one line."""
    port = free_port()
    path = write(tmp_path, VALID.replace('bind = "127.0.0.1:0"', f'bind = "192.0.2.1:{port}"'))
    result = lbnode("run", "--config", str(path), cwd=tmp_path, timeout=15)
    assert_one_line_error(
        result,
        f"lbnode: {path}: listener web: cannot listen on 192.0.2.1:{port}: Cannot assign requested address",
    )
