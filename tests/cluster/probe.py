"""A client in its own namespace: a new TCP connection to HOST:PORT every INTERVAL, one line per try.

``probe.py HOST PORT INTERVAL [tcp|http|sticky] [CONNECT_TIMEOUT]``. Open loop: a try starts every
INTERVAL whether or not the earlier ones have finished (a steady request rate, as real clients
keep coming during an outage). Each line is ``<CLOCK_MONOTONIC seconds when it started>
<seconds it took> ok <what>`` (``tcp``: the first word the server sent; ``http``: the first word
of the body of a 200 answer to ``GET /``) or ``<started> <took> fail <reason>``. A SYN that is
not answered is sent again by the kernel after 1 s: with CONNECT_TIMEOUT above that (a real
client's patience), such a try succeeds late instead of failing. The clock is the host's, shared by every namespace,
so the test can compare it with its own.

``sticky``: as ``http``, but first tries one at a time until an answer sets a cookie, then sends
that cookie with every request (a browser's session); ``what`` is the backend that answered.
"""

from __future__ import annotations

import asyncio
import sys
import time

# Once connected, the whole answer through the proxy: generous, this is not what is measured.
ANSWER_TIMEOUT = 2.0


class Client:
    def __init__(self, host: str, port: int, mode: str, connect_timeout: float) -> None:
        self.host, self.port, self.mode = host, port, mode
        self.connect_timeout = connect_timeout
        self.cookie: str | None = None

    async def once(self) -> tuple[bool, str]:
        started = time.monotonic()
        try:
            ok, what = await self._exchange()
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            ok, what = False, type(exc).__name__
        print(f"{started:.4f} {time.monotonic() - started:.4f} {'ok' if ok else 'fail'} {what}", flush=True)
        return ok, what

    async def _exchange(self) -> tuple[bool, str]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.connect_timeout)
        try:
            if self.mode == "tcp":
                answer = await asyncio.wait_for(reader.readline(), ANSWER_TIMEOUT)
                words = answer.decode(errors="replace").split()
                return bool(words), words[0] if words else "empty"
            cookie = f"Cookie: {self.cookie}\r\n" if self.cookie else ""
            host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal is bracketed
            writer.write(f"GET / HTTP/1.0\r\nHost: {host}\r\n{cookie}\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), ANSWER_TIMEOUT)
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        if not lines[0].startswith(("HTTP/1.0 200", "HTTP/1.1 200")):
            return False, lines[0].replace(" ", "_") or "no_answer"
        if self.mode == "sticky" and self.cookie is None:
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "set-cookie":
                    self.cookie = value.strip().split(";")[0]
        words = body.decode(errors="replace").split()
        return True, words[0] if words else "?"


async def main() -> None:
    host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "tcp"
    connect_timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 0.2
    if mode not in ("tcp", "http", "sticky"):
        raise SystemExit(f"mode {mode!r} is not tcp, http or sticky")
    client = Client(host, port, mode, connect_timeout)
    if mode == "sticky":
        while client.cookie is None:  # the session starts with one answer that sets the cookie
            await client.once()
            await asyncio.sleep(interval)
    tasks: set[asyncio.Task[tuple[bool, str]]] = set()
    next_at = time.monotonic()
    while True:
        task = asyncio.create_task(client.once())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


if __name__ == "__main__":
    asyncio.run(main())
