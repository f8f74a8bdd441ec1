"""Slow clients for the flood tests, as their own process: ``python -m tests.slowclients``.

Owns the attackers only (slowloris: a request head sent one byte every few seconds,
reconnecting when the node gives up on it); the measuring client lives in the test,
so the attackers' work never runs on the loop that times the ordinary requests.
Prints ``ready N`` once each attacker has connected once, then runs until killed.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys

import trio

# Opened at most this many at once, so the node's listen backlog never overflows (a
# dropped SYN costs a 1 s retransmit and the "ready" line would wait for it).
CONNECT_BATCH = 200


async def slowloris(host: str, port: int, interval: tuple[float, float], rng: random.Random, opened: list[int],
                    ready: trio.Event, connect_lock: trio.Semaphore) -> None:
    """One attacker for ever: connect, send a head that never ends, a byte every ``interval``
    seconds (drawn between its two bounds for each byte)."""
    while True:
        try:
            async with connect_lock:
                stream = await trio.open_tcp_stream(host, port)
            opened[0] += 1
            if opened[0] == opened[1]:
                ready.set()
            async with stream:
                await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: slowloris\r\nX-Slow: ")
                await trio.sleep(rng.uniform(0, interval[1]))  # spread the bytes over the interval
                while True:
                    await stream.send_all(b"a")
                    await trio.sleep(rng.uniform(*interval))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the node answered 408 and closed (or reset): come back, as an attacker would
        await trio.sleep(rng.uniform(0, interval[1]))


async def main(host: str, port: int, count: int, interval: tuple[float, float]) -> None:
    rng = random.Random(count)
    opened = [0, count]  # [connections opened so far, target for "ready"]
    ready = trio.Event()
    connect_lock = trio.Semaphore(CONNECT_BATCH)
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(slowloris, host, port, interval, rng, opened, ready, connect_lock)
        await ready.wait()
        print(f"ready {count}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--max-interval", type=float, help="draw each gap between --interval and this (default: fixed)")
    args = parser.parse_args()
    # Each attacker is one descriptor: raise this process's soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.count + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        trio.run(main, args.host, args.port, args.count, (args.interval, args.max_interval or args.interval))
    except KeyboardInterrupt:
        sys.exit(0)
