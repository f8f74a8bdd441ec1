"""``python -m bench.tls_floor``: the CPU a full TLS handshake costs a bare Python server, the
floor under lbnode's figure in bench/tls.py (docs/tls.md, "Where a handshake's CPU goes").

Each variant is a minimal server in its own process (pinned like the bench's balancers): a
blocking accept, then the connection as lbnode drives it (a non-blocking ``ssl.SSLSocket``,
``do_handshake`` until done, waiting with ``poll`` between), one read of the request, one
fixed 200 response with a 100-byte body, close. ``openssl s_time -new`` (bench/tls.py's
request, on the other CPU) drives each in turn, in interleaved rounds (ABBA); the figure is
the server's CPU time (user + system, /proc) per connection. The variants add one piece of
lbnode's handshake at a time:

- ``plain``: one context with the certificate, Python's defaults (2 TLS 1.3 tickets);
- ``tickets0``: the same with ``num_tickets = 0``;
- ``sni``: a certificate-less listener context whose SNI callback switches the connection to
  the certificate's context (as ``lbnode.tls.context`` does);
- ``lbnode-ctx``: ``lbnode.tls.context``'s own listener and certificate contexts and SNI
  callback, on the bench's certificate;
- ``trio``: ``lbnode-ctx`` served the way lbnode serves a connection, without the HTTP proxy:
  a Trio run, ``lbnode.sockio.accept`` and a task per connection, ``lbnode.tls.terminate``'s
  ``handshake`` (Trio readiness waits), ``sockio.recv_some`` / ``send_all``, ``close_tls``;
- ``terminator``: the same through ``TlsTerminator.handle`` itself (its timeout scope, its cap
  on handshakes in progress, its counters) with a fixed response as the inner handler.

``--pieces`` measures, in this process, what the layers are made of: the server side of a
full handshake over memory BIOs with 2, 1 and 0 TLS 1.3 tickets, a readiness wait that
parks in Trio against one with ``poll``, and a Trio task spawned, run and ended.

``haproxy`` and ``lbnode`` (this checkout) run bench/tls.py's configuration (nginx backends
behind them) in the same rounds, so that every figure has HAProxy's beside it at the same
load of the machine.
"""

from __future__ import annotations

import argparse
import select
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.configs import HOST
from bench.harness import Context, Options, Proc, StartError, pick_port
from bench.procstat import tree_cpu_seconds
from bench.tls import _certificate, _s_time, fulcrum_tls_config, haproxy_tls_config

VARIANTS = ("plain", "tickets0", "sni", "lbnode-ctx", "trio", "terminator")
REFERENCES = ("haproxy", "lbnode")  # bench/tls.py's two balancers, measured in the same rounds
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n" + b"x" * 100


def _context(variant: str, cert: str, key: str) -> ssl.SSLContext:
    if variant == "lbnode-ctx":
        from lbnode.model import ListenerTls
        from lbnode.tls.certs import load_certificate
        from lbnode.tls.context import certificate_context, listener_context

        settings = ListenerTls(certificates=("bench",))
        pems = Path(cert).read_bytes(), Path(key).read_bytes()
        chosen = certificate_context((load_certificate("bench", pems[0], pems[1]),), settings, ("http/1.1",))
        ctx = listener_context(settings, ("http/1.1",))

        def switch(sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            sock.context = chosen

        ctx.sni_callback = switch
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if variant == "sni":
        inner = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        inner.set_alpn_protocols(["http/1.1"])
        inner.load_cert_chain(cert, key)

        def to_inner(sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            sock.context = inner

        ctx.sni_callback = to_inner
        return ctx
    ctx.load_cert_chain(cert, key)
    if variant == "tickets0":
        ctx.num_tickets = 0
    return ctx


def serve(variant: str, port: int, cert: str, key: str) -> None:
    """The server of one variant, until killed; with lbnode's collector settings (cli.py)."""
    import gc

    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    if variant in ("trio", "terminator"):
        import trio

        trio.run(_serve_trio, variant, port, cert, key)
        return
    ctx = _context(variant, cert, key)
    lsock = socket.create_server((HOST, port), backlog=128)
    poller = select.poll()
    while True:
        conn, _ = lsock.accept()
        conn.setblocking(False)
        tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    _wait(poller, tls, select.POLLIN)
                except ssl.SSLWantWriteError:
                    _wait(poller, tls, select.POLLOUT)
            data = b""
            while b"\r\n\r\n" not in data:
                try:
                    chunk = tls.recv(16384)
                except ssl.SSLWantReadError:
                    _wait(poller, tls, select.POLLIN)
                    continue
                if not chunk:
                    break
                data += chunk
            tls.send(RESPONSE)
        except (OSError, ssl.SSLError):
            pass
        finally:
            tls.close()


async def _serve_trio(variant: str, port: int, cert: str, key: str) -> None:
    import trio

    from lbnode.sockio import accept, recv_some, send_all
    from lbnode.tls.terminate import close_tls, handshake

    ctx = _context("lbnode-ctx", cert, key)
    lsock = socket.create_server((HOST, port), backlog=128)
    lsock.setblocking(False)

    async def respond(tls: ssl.SSLSocket, _ip: str, _headers: bytes) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await recv_some(tls, 16384)
            if not chunk:
                return
            data += chunk
        await send_all(tls, RESPONSE)

    async def plain_trio(conn: socket.socket, ip: str) -> None:
        tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            await handshake(tls)
            await respond(tls, ip, b"")
        except (OSError, ssl.SSLError):
            pass
        finally:
            close_tls(tls)

    handler: Callable[[socket.socket, str], Awaitable[None]] = plain_trio
    if variant == "terminator":
        from lbnode.model import Address, Listener, ListenerTls
        from lbnode.tls.terminate import TlsTerminator

        class Node:
            snapshot = _fixed_snapshot(cert, key)

        listener = Listener(name="tls", protocol="https", bind=Address(HOST, port), pool="web",
                            tls=ListenerTls(certificates=("bench",)))
        handler = TlsTerminator(listener, Node(), respond).handle
    async with trio.open_nursery() as nursery:
        while True:
            conn, peer = await accept(lsock)
            nursery.start_soon(handler, conn, peer[0] if isinstance(peer, tuple) else "")


def _fixed_snapshot(cert: str, key: str) -> Any:
    """What the SNI callback reads of a snapshot: the listener's table, one certificate."""
    from lbnode.tls.certs import load_certificate

    chosen = load_certificate("bench", Path(cert).read_bytes(), Path(key).read_bytes())

    class Table:
        def choose(self, _name: str | None) -> object:
            return chosen

        def key_pairs(self, c: object) -> tuple[object, ...]:
            return (c,)

    class Snap:
        sni = {"tls": Table()}

    return Snap


def _wait(poller: select.poll, sock: socket.socket, events: int) -> None:
    poller.register(sock, events)
    try:
        poller.poll()
    finally:
        poller.unregister(sock)


def _reference(ctx: Context, name: str, cert: Path, key: Path, pem: Path, taken: set[int]) -> tuple[Proc, int]:
    ctx.backends()
    backends = list(ctx.ports.backends)
    port = pick_port(29700 if name == "haproxy" else 29710, taken)
    taken.add(port)
    if name == "haproxy":
        conf = ctx.tmp / "haproxy-tls.cfg"
        conf.write_text(haproxy_tls_config(backends, port, pem))
        argv = ["haproxy", "-f", str(conf), "-db"]
    else:
        admin = pick_port(29711, taken)
        taken.add(admin)
        conf = ctx.tmp / "lbnode-tls.toml"
        conf.write_text(fulcrum_tls_config(backends, port, admin, cert, key))
        argv = ["env", f"PYTHONPATH={ctx.repo}", sys.executable, "-c",
                "import sys; from lbnode.cli import main; sys.exit(main())", "run", "--config", str(conf)]
    proc = ctx.spawn(name, argv, pin_balancer=True)
    proc.wait_ready([port], ctx.opts.start_timeout)
    return proc, port


def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="fulcrum-tls-floor-"))
    ctx = Context(Options(start_timeout=20.0), Path(__file__).resolve().parent.parent, tmp)
    cert, key, pem = _certificate(tmp)
    procs: dict[str, tuple[Proc, int]] = {}
    taken: set[int] = set()
    try:
        for variant in args.variant or REFERENCES + VARIANTS:
            if variant in REFERENCES:
                procs[variant] = _reference(ctx, variant, cert, key, pem, taken)
        for i, variant in enumerate(v for v in args.variant or VARIANTS if v in VARIANTS):
            port = pick_port(29600 + i, taken)
            taken.add(port)
            proc = ctx.spawn(f"floor-{variant}", ["env", f"PYTHONPATH={ctx.repo}", sys.executable, "-m", "bench.tls_floor", "--serve", variant,
                                                  "--port", str(port), "--cert", str(cert), "--key", str(key)],
                             pin_balancer=True)
            proc.wait_ready([port], ctx.opts.start_timeout)
            procs[variant] = proc, port
        names = list(procs)
        for name in names:
            _s_time(ctx, procs[name][1], 1)  # warm-up
        results: dict[str, list[float]] = {name: [] for name in names}
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else reversed(names):
                proc, port = procs[name]
                cpu0 = tree_cpu_seconds([proc.pid])
                n, _ = _s_time(ctx, port, args.seconds)
                cpu1 = tree_cpu_seconds([proc.pid])
                results[name].append((cpu1 - cpu0) * 1e6 / max(n, 1))
                print(f"round {rnd} {name}: {results[name][-1]:.1f} us/connection ({n} connections)", flush=True)
        print(f"## bare Python server, openssl s_time -new, {args.seconds:g} s runs, load "
              f"{Path('/proc/loadavg').read_text().split()[:3]}")
        ref = statistics.median(results["haproxy"]) if results.get("haproxy") else None
        for name, figures in results.items():
            med = statistics.median(figures)
            print(f"{name}: median {med:.1f} us/connection (range {min(figures):.1f}-{max(figures):.1f}, "
                  f"{len(figures)} runs)" + (f", {med / ref:.2f} x haproxy" if ref else ""))
    except StartError as exc:
        print(f"tls_floor: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.close()
    return 0


def _handshake_server_cpu(server: ssl.SSLContext, client: ssl.SSLContext) -> float:
    """CPU seconds of the server side of one full handshake over memory BIOs."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = client.wrap_bio(c_in, c_out, server_hostname="bench.test")
    spent = 0.0
    t0 = time.process_time()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    spent += time.process_time() - t0
    c_done = s_done = False
    while not (c_done and s_done):
        if not c_done:
            try:
                cli.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            t0 = time.process_time()
            try:
                srv.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
            spent += time.process_time() - t0
        c_in.write(s_out.read())
    return spent


def _poll_wait_us(n: int) -> float:
    a, b = socket.socketpair()
    b.setblocking(False)
    poller = select.poll()
    t0 = time.process_time()
    for _ in range(n):
        a.send(b"x")
        _wait(poller, b, select.POLLIN)
        b.recv(1)
    spent = time.process_time() - t0
    a.close()
    b.close()
    return 1e6 * spent / n


async def _trio_wait_us(n: int) -> float:
    """A wait that parks: the sender sends only after a pass of the run loop."""
    import trio

    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def waiter() -> None:
        for _ in range(n):
            await trio.lowlevel.wait_readable(b)
            b.recv(1)

    async def sender() -> None:
        for _ in range(n):
            await trio.sleep(0)
            a.send(b"x")

    t0 = time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(sender)
    spent = time.process_time() - t0
    a.close()
    b.close()
    return 1e6 * spent / n


async def _trio_spawn_us(n: int) -> float:
    import trio

    async def noop() -> None:
        pass

    t0 = time.process_time()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(noop)
            if i % 100 == 99:
                await trio.sleep(0)
    return 1e6 * (time.process_time() - t0) / n


def pieces(rounds: int) -> int:
    import trio

    tmp = Path(tempfile.mkdtemp(prefix="fulcrum-tls-pieces-"))
    cert, key, _ = _certificate(tmp)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    servers = {}
    for tickets in (2, 1, 0):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.num_tickets = tickets
        servers[f"server side of a full handshake, {tickets} tickets"] = ctx
    results: dict[str, list[float]] = {name: [] for name in servers}
    results.update({"a parked wait, poll": [], "a parked wait, Trio": [], "a Trio task spawned and ended": []})
    for rnd in range(rounds):
        for name, ctx in servers.items() if rnd % 2 == 0 else reversed(servers.items()):
            results[name].append(1e6 * sum(_handshake_server_cpu(ctx, client) for _ in range(200)) / 200)
        results["a parked wait, poll"].append(_poll_wait_us(20_000))
        results["a parked wait, Trio"].append(trio.run(_trio_wait_us, 20_000))
        results["a Trio task spawned and ended"].append(trio.run(_trio_spawn_us, 20_000))
    print(f"## pieces, {rounds} rounds, load {Path('/proc/loadavg').read_text().split()[:3]}")
    for name, figures in results.items():
        print(f"{name}: median {statistics.median(figures):.1f} us (range {min(figures):.1f}-{max(figures):.1f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", choices=REFERENCES + VARIANTS, help="measure only these (repeatable)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--pieces", action="store_true", help="measure the pieces in this process, and exit")
    p.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cert", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.cert, args.key)
        return 0
    if args.pieces:
        return pieces(args.rounds)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
