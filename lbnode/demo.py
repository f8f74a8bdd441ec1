"""``lbnode demo``: three demo backends on loopback and one node in front of them.

Owns the built-in demo configuration, so a newcomer sees L7 and L4 balancing
with one command. Runs until Ctrl-C, then stops everything cleanly.
"""

from __future__ import annotations

import logging
import sys

import trio

from lbnode.config import load_config_text
from lbnode.demo_backend import serve_demo_backend
from lbnode.listen import BindError
from lbnode.node import LbNode

log = logging.getLogger("lbnode.demo")

BACKENDS = (("alpha", 9001), ("beta", 9002), ("gamma", 9003))
HTTP_BIND = "127.0.0.1:8080"
TCP_BIND = "127.0.0.1:8081"
ADMIN_BIND = "127.0.0.1:7070"


def demo_config_text(ports: list[int]) -> str:
    backends = "".join(
        f'  [[pools.backends]]\n  address = "127.0.0.1:{port}"\n  name = "{name}"\n'
        for (name, _), port in zip(BACKENDS, ports, strict=True)
    )
    return f"""\
[node]
id = "demo"
admin = "{ADMIN_BIND}"
drain_timeout = "5s"
# One process: `lbnode demo` runs the node and its three backends in one trio.run. (`lbnode
# run`'s default is "auto", a worker process per core.)
workers = 1

[[listeners]]
name = "web"
protocol = "http"
bind = "{HTTP_BIND}"
pool = "web"

[[listeners]]
name = "tcp"
protocol = "tcp"
bind = "{TCP_BIND}"
pool = "web"

[[pools]]
name = "web"
algorithm = "round_robin"
{backends}"""


USAGE = """\
Fulcrum demo is up: backends alpha, beta, gamma on 127.0.0.1:{ports}.
  curl http://127.0.0.1:8080/                  # L7: each call names the backend that served it
  curl http://127.0.0.1:8080/echo -d hello     # what the backend received (X-Forwarded-For, Via...)
  curl 'http://127.0.0.1:8080/slow?ms=500'     # a slow answer
  curl http://127.0.0.1:8080/status/503        # a backend's own 503 passes through
  curl 'http://127.0.0.1:8080/bytes?n=10000000' -o /dev/null   # a 10 MB download
  curl http://127.0.0.1:8081/                  # L4: the same backends through the TCP listener
  curl http://127.0.0.1:7070/status            # node status as JSON
Ctrl-C stops everything.
"""


async def run_demo() -> None:
    async with trio.open_nursery() as nursery:
        ports: list[int] = []
        for name, port in BACKENDS:
            try:
                ports.append(await nursery.start(serve_demo_backend, name, "127.0.0.1", port))
            except OSError as exc:
                raise BindError(f"demo backend {name}: cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
        node = LbNode(load_config_text(demo_config_text(ports), "demo"))
        # node.run returns after a graceful stop (Ctrl-C / SIGTERM); then the backends go too.
        async with trio.open_nursery() as serving:
            await serving.start(node.run)
            print(USAGE.format(ports=", ".join(map(str, ports))), file=sys.stderr, flush=True)
        nursery.cancel_scope.cancel()
