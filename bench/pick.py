"""Cost of one balancing decision, per policy, with 10 and 1,000 backends (all usable).

``python -m bench.pick`` prints a markdown table; ``run()`` returns it (the
side-by-side benchmark includes it as a section). CPU only: no sockets.
Columns, in microseconds per request (best of several rounds, loop included):

- pick: ``policy.pick(ctx, usable)`` with a trivial ``usable``;
- pick+start+finish: the same plus ``on_start``/``on_finish``, as the data plane calls them;
- data plane: ``PoolRuntime.choose`` + ``started`` + ``finished``, with the real
  ``usable`` (health, admin state, limits) that the proxies use.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from lbnode.balance import PickContext, Policy, make_policy
from lbnode.model import ALGORITHMS, Address, Backend, Pool
from lbnode.runtime import PoolRuntime

SIZES = (10, 1000)
WEIGHTS = (1, 2, 3, 4)  # mixed weights: the harder case for every weighted index
CONTEXTS = 1024  # distinct clients / keys cycled through (a power of two, for masking)
TARGET_US = 5.0  # per-pick budget from the design brief


def _pool(algorithm: str, n: int) -> Pool:
    backends = tuple(
        Backend(
            address=Address(f"127.{i // 65536}.{i // 256 % 256}.{i % 256}", 8080),
            weight=WEIGHTS[i % len(WEIGHTS)],
        )
        for i in range(n)
    )
    return Pool(name="bench", backends=backends, algorithm=algorithm)


def _contexts() -> list[PickContext]:
    rng = random.Random(1)
    return [
        PickContext(
            client_ip=f"198.51.{rng.randrange(256)}.{rng.randrange(256)}",
            hash_key=f"session-{rng.getrandbits(64):016x}".encode(),
        )
        for _ in range(CONTEXTS)
    ]


def _always(i: int) -> bool:
    return True


def _best_of(rounds: int, iterations: int, body: Callable[[int], None]) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        body(iterations)
        best = min(best, (time.perf_counter() - t) / iterations)
    return best * 1e6


def _pick_only(policy: Policy, ctxs: list[PickContext]) -> Callable[[int], None]:
    pick, mask = policy.pick, len(ctxs) - 1

    def body(iterations: int) -> None:
        for k in range(iterations):
            pick(ctxs[k & mask], _always)

    return body


def _pick_start_finish(policy: Policy, ctxs: list[PickContext]) -> Callable[[int], None]:
    pick, start, finish, mask = policy.pick, policy.on_start, policy.on_finish, len(ctxs) - 1

    def body(iterations: int) -> None:
        for k in range(iterations):
            i = pick(ctxs[k & mask], _always)
            assert i is not None
            start(i)
            finish(i, 0.002, k * 0.001)

    return body


def _data_plane(runtime: PoolRuntime, ctxs: list[PickContext]) -> Callable[[int], None]:
    choose, started, finished, mask = (
        runtime.choose,
        runtime.started,
        runtime.finished,
        len(ctxs) - 1,
    )

    def body(iterations: int) -> None:
        for k in range(iterations):
            now = k * 0.001
            backend = choose(ctxs[k & mask], now)
            assert backend is not None
            started(backend)
            finished(backend, 0.002, now)

    return body


def measure(
    iterations: int = 20_000, rounds: int = 3
) -> list[tuple[str, int, float, float, float]]:
    """(algorithm, backends, pick us, pick+start+finish us, data plane us) per row."""
    ctxs = _contexts()
    rows = []
    for algorithm in ALGORITHMS:
        for n in SIZES:
            pool = _pool(algorithm, n)
            p1 = make_policy(pool, random.Random(2))
            p2 = make_policy(pool, random.Random(2))
            runtime = PoolRuntime(pool, rng=random.Random(2))
            rows.append(
                (
                    algorithm,
                    n,
                    _best_of(rounds, iterations, _pick_only(p1, ctxs)),
                    _best_of(rounds, iterations, _pick_start_finish(p2, ctxs)),
                    _best_of(rounds, iterations, _data_plane(runtime, ctxs)),
                )
            )
    return rows


def render(rows: list[tuple[str, int, float, float, float]]) -> str:
    lines = [
        "| policy | backends | pick (µs) | pick+start+finish (µs) | data plane (µs) |",
        "|---|---:|---:|---:|---:|",
    ]
    for algorithm, n, pick, cycle, plane in rows:
        mark = "" if cycle <= TARGET_US else " ⚠"
        lines.append(f"| {algorithm} | {n} | {pick:.2f} | {cycle:.2f}{mark} | {plane:.2f} |")
    lines.append("")
    lines.append(
        f"Weights cycle {', '.join(map(str, WEIGHTS))}; all backends usable; "
        f"{CONTEXTS} distinct client IPs / hash keys; ⚠ = over the {TARGET_US:g} µs budget."
    )
    return "\n".join(lines)


def run() -> str:
    """The pick-cost table as markdown (used by ``python -m bench``)."""
    return render(measure())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pick", description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=20_000, help="picks per round (default 20000)")
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds per cell; the best is kept (default 3)"
    )
    args = p.parse_args(argv)
    print(render(measure(args.iterations, args.rounds)))


if __name__ == "__main__":
    main()
