"""A client in its own namespace: one TCP connection to HOST:PORT every INTERVAL, one line per try.

``probe.py HOST PORT INTERVAL [http]``. Each line is ``<CLOCK_MONOTONIC seconds> ok <what>``
(what the server sent first; with ``http``, the body of a 200 answer to ``GET /``) or
``<seconds> fail <reason>``; the clock is the host's, shared by every namespace, so the test
can compare it with its own.
"""

from __future__ import annotations

import socket
import sys
import time

# A SYN to a dead host's MAC is never answered: give up quickly and try again.
CONNECT_TIMEOUT = 0.2
# Once connected, the whole answer through the proxy: generous, this is not what is measured.
HTTP_TIMEOUT = 2.0


def main() -> None:
    host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    http = sys.argv[4:] == ["http"]
    while True:
        started = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as s:
                s.settimeout(HTTP_TIMEOUT if http else CONNECT_TIMEOUT)
                if http:
                    s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
                    if not http:
                        break
            if http:
                head, _, body = answer.partition(b"\r\n\r\n")
                if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                    raise OSError(head.split(b"\r\n")[0].decode(errors="replace").replace(" ", "_"))
                answer = body
            what = answer.decode(errors="replace").split()
            line = f"{started:.3f} ok {what[0] if what else '?'}"
        except OSError as exc:
            line = f"{started:.3f} fail {type(exc).__name__}"
        print(line, flush=True)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


if __name__ == "__main__":
    main()
