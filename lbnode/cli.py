"""``lbnode`` command line: run (and run --takeover), reload, check, demo.

Owns turning operator mistakes into one line on stderr and an exit status;
never prints a traceback for a bad file or a busy port.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from lbnode import __version__
from lbnode.accesslog import AccessLogError
from lbnode.config import load_config
from lbnode.listen import BindError
from lbnode.model import ConfigFileError


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigFileError as exc:
        print(f"lbnode: {exc}", file=sys.stderr)
        return 1
    # workers as resolved ("auto": the cores this process may use, as `lbnode run` would)
    print(
        f"{args.config}: ok (node {config.node.id}, {len(config.listeners)} listeners, "
        f"{len(config.pools)} pools, {sum(len(p.backends) for p in config.pools)} backends, "
        f"{config.node.workers} workers)"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from lbnode.config import read_config_text
    from lbnode.node import LbNode, node_from_config

    setup_logging(args.log_level)
    try:
        text = read_config_text(args.config)
        config = load_config(args.config, text)
    except ConfigFileError as exc:
        print(f"lbnode: {exc}", file=sys.stderr)
        return 1
    takeover = None
    if args.takeover:
        from lbnode.handover import CommandError, Takeover, socket_path

        try:
            takeover = Takeover.start(socket_path(config.node.state_dir))
            if config.cluster is not None and takeover.cluster is not None:
                # the same member goes on in this process (its lease, VIPs and heartbeats are
                # adopted: docs/reload.md); another identity would register beside it
                mismatch = takeover.cluster_mismatch(config.node.id, config.cluster.prefix, bool(config.cluster.vips))
                if mismatch is not None:
                    raise CommandError(mismatch)
            if config.control is not None:
                # The store file gets one writer, and grpc binds the port anew: the old node's
                # control API stops before this one reads the store (lbctl is refused meanwhile).
                takeover.release_control()
        except CommandError as exc:
            if takeover is not None:
                takeover.abandon()
            print(f"lbnode: {args.config}: --takeover: {exc}", file=sys.stderr)
            return 1
    lock = None
    if takeover is not None and takeover.lock is not None:
        lock = takeover.hold_lock()
    elif config.cluster is not None or config.control is not None:
        # state_dir holds this node's pools (control API) or its identity in the cluster
        from lbnode.statedir import StateDirInUse, lock_state_dir

        try:
            lock = lock_state_dir(Path(config.node.state_dir))
        except (StateDirInUse, OSError) as exc:
            print(f"lbnode: {args.config}: {exc}", file=sys.stderr)
            return 1
    node: LbNode
    try:
        if config.node.workers > 1:
            # A supervisor and N worker processes (docs/architecture.md); 1 stays one process.
            from lbnode.supervisor import Supervisor

            supervisor = node_from_config(config, Supervisor)
            assert isinstance(supervisor, Supervisor)
            supervisor.log_level = args.log_level
            supervisor.config_text = text  # what its workers read: the file as checked here
            node = supervisor
        else:
            node = node_from_config(config)
    except ConfigFileError as exc:  # a corrupt state_dir/pools.json
        if takeover is not None:
            takeover.abandon()
        print(f"lbnode: {exc}", file=sys.stderr)
        return 1
    from lbnode.handover import CommandSocket, socket_path

    node.state_lock = lock
    node.config_path = Path(args.config).resolve()
    node.command_socket = CommandSocket(socket_path(config.node.state_dir))
    node.takeover = takeover
    # Everything loaded so far lives as long as the process: out of the collector's sight. And a
    # request allocates a few hundred objects, so the default gen-0 threshold (700) collects
    # every couple of requests: 10,000 (measured: about 2.5% less CPU per request).
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    clock: trio.abc.Clock | None = None
    if takeover is not None and takeover.clock_offset is not None:
        from lbnode.handover import HandoverClock

        clock = HandoverClock(takeover.clock_offset)  # the times the old process hands over mean the same here
    try:
        return _run_reporting_bind_errors(lambda: trio.run(node.run, clock=clock), f"lbnode: {args.config}")
    finally:
        if lock is not None:
            lock.close()


def _cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running node (its command socket in [node] state_dir) to read the file again."""
    from lbnode.handover import CommandError, request, socket_path

    try:
        config = load_config(args.config)
    except ConfigFileError as exc:
        print(f"lbnode: reload refused: {exc}", file=sys.stderr)
        return 1
    try:
        answer = request(socket_path(config.node.state_dir),
                         {"command": "reload", "config": str(Path(args.config).resolve())})
    except CommandError as exc:
        print(f"lbnode: {args.config}: {exc}", file=sys.stderr)
        return 1
    if not answer.get("ok"):
        print(f"lbnode: {answer.get('message')}", file=sys.stderr)
        return 1
    print(answer.get("message"))
    return 0


def _run_reporting_bind_errors(run: Callable[[], None], prefix: str) -> int:
    """Run; a port in use (raised inside nurseries, so maybe grouped), an access log file that
    cannot be opened, or a takeover whose running node stopped answering is one line, exit 1."""
    from lbnode.handover import CommandError  # a takeover's conversation broken while starting

    try:
        run()
    except (BindError, AccessLogError, CommandError) as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        bind_errors, rest = group.split((BindError, CommandError))
        if bind_errors is None or rest is not None:
            raise
        print(f"{prefix}: {_first(bind_errors)}", file=sys.stderr)
        return 1
    return 0


def _first(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.cluster:
        from lbnode.demo_cluster import run_cluster_demo

        return run_cluster_demo(loopback=args.loopback)
    if args.loopback:
        print("lbnode demo: --loopback goes with --cluster", file=sys.stderr)
        return 2
    from lbnode.demo import run_demo

    setup_logging(args.log_level)
    return _run_reporting_bind_errors(lambda: trio.run(run_demo), "lbnode demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbnode", description="Fulcrum load-balancer node")
    parser.add_argument("--version", action="version", version=f"lbnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="serve the listeners of a config file")
    p_run.add_argument("--config", "-c", required=True, help="path to node.toml")
    p_run.add_argument("--log-level", default="INFO")
    p_run.add_argument("--takeover", action="store_true",
                       help="take over the listening sockets of the lbnode running with this state_dir "
                       "(binary upgrade): it drains and exits once this one serves")
    p_run.set_defaults(func=_cmd_run)
    p_reload = sub.add_parser("reload", help="the running node reads node.toml again and applies it "
                              "(same as SIGHUP; an invalid file is refused and the node goes on)")
    p_reload.add_argument("--config", "-c", required=True, help="path to node.toml")
    p_reload.set_defaults(func=_cmd_reload)
    p_check = sub.add_parser("check", help="validate a config file and exit 0 (valid) or 1")
    p_check.add_argument("--config", "-c", required=True, help="path to node.toml")
    p_check.set_defaults(func=_cmd_check)
    p_demo = sub.add_parser("demo", help="three demo backends and a node in front of them (--cluster: three nodes)")
    p_demo.add_argument("--log-level", default="INFO")
    p_demo.add_argument("--cluster", action="store_true",
                        help="etcd, three nodes, a VIP and lbctl set up: in network namespaces as root, "
                        "on 127.0.0.11-13 otherwise (needs the etcd binary: Debian package etcd-server)")
    p_demo.add_argument("--loopback", action="store_true",
                        help="with --cluster: on 127.0.0.11-13 even as root (no namespaces, no VIP)")
    p_demo.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
