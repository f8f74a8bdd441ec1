"""``python bench/slow_backend.py --port P --delay-ms 20``: an HTTP/1.1 backend that answers late.

The slow backend of the tail-latency section: every request gets the benchmark's
100-byte body after ``--delay-ms``, on keep-alive connections; ``GET /__count``
answers (at once, uncounted) how many requests it has served. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

# Started as a file from the benchmark's temp dir: make ``bench`` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.configs import HOST, SMALL_BODY  # noqa: E402

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n" % len(SMALL_BODY) + SMALL_BODY
MAX_HEAD = 64 * 1024  # wrk's heads are tiny; anything larger is not our client


class Counter:
    served = 0


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, count: Counter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEAD:
                break
            if head.startswith(b"GET /__count "):
                body = str(count.served).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                continue
            await asyncio.sleep(delay)  # GETs only: wrk sends no bodies
            count.served += 1
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, delay: float) -> None:
    count = Counter()
    server = await asyncio.start_server(lambda r, w: serve(r, w, delay, count), HOST, port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/slow_backend.py", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=20.0)
    args = p.parse_args()
    asyncio.run(main(args.port, args.delay_ms / 1000))
