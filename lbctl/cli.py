"""``lbctl``: the Fulcrum control CLI (a gRPC client; it never talks to etcd).

Only ``--version`` for now: the control API arrives with the cluster issue.
"""

from __future__ import annotations

import argparse
import sys

from lbctl import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbctl", description="Fulcrum control CLI")
    parser.add_argument("--version", action="version", version=f"lbctl {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
