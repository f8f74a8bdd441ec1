"""A real headless Chromium driven over the DevTools protocol, for the status page's tests.

Debian's ``chromium`` package (``make sysdeps-test``). The protocol's WebSocket is spoken here
with the standard library (about sixty lines: text frames, client masking, continuation) so
the tests need no WebSocket package. Blocking: call it from a worker thread in Trio tests.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium")
# Chromium's start on 2 cores busy with other suites: ~1-3 s seen; 30 s of margin.
START_TIMEOUT = 30.0


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol (text messages, no extensions)."""

    def __init__(self, host: str, port: int, path: str, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the WebSocket handshake")
            head += chunk
        head, self._buffer = head.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"DevTools refused the WebSocket: {head[:100]!r}")

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("DevTools closed the WebSocket")
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def send(self, text: str) -> None:
        payload = text.encode()
        n = len(payload)
        head = bytes([0x81])  # FIN, text
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)  # a client masks every frame (RFC 6455 5.3)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)  # a server never masks
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode in (0x9, 0xA):
                continue  # ping/pong: Chromium sends none to clients; skipped if it did
            message += payload
            if b0 & 0x80:
                return message.decode()

    def close(self) -> None:
        self.sock.close()


def _http_get(port: int, path: str) -> bytes:
    """The body of one GET to DevTools' HTTP side (it keeps the connection open: read Content-Length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"DevTools closed {path} before its head")
            raw += chunk
        head, body = raw.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"DevTools closed {path} mid-body")
            body += chunk
        return body


class Chromium:
    """One headless Chromium with one page. ``with Chromium(tmp) as page: page.navigate(url)``."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        assert CHROMIUM is not None, "chromium missing: run `make sysdeps-test` (Debian package chromium)"
        self.profile = profile
        profile.mkdir(parents=True, exist_ok=True)
        self.log = open(profile / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox",  # root in the test VM: no user namespace sandbox
             "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self._id = 0
        try:
            port = self._devtools_port()
            self.ws = WebSocket("127.0.0.1", port, self._page_path(port), timeout=START_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self) -> int:
        active = self.profile / "DevToolsActivePort"  # Chromium writes it once it listens
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: see {self.profile}/chromium.log")
            try:
                return int(active.read_text().split()[0])
            except (FileNotFoundError, IndexError, ValueError):
                time.sleep(0.05)
        raise TimeoutError(f"chromium did not open DevTools within {START_TIMEOUT:g}s")

    @staticmethod
    def _page_path(port: int) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            targets = json.loads(_http_get(port, "/json/list"))
            for target in targets:
                if target.get("type") == "page":
                    url = target["webSocketDebuggerUrl"]
                    return "/" + url.split("/", 3)[3]
            time.sleep(0.1)  # the first tab not open yet
        raise TimeoutError("chromium opened no page")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events arriving meanwhile are dropped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, width: int | None = None, height: int | None = None, mobile: bool = False) -> None:
        """A PNG of the whole page; ``width``/``height``/``mobile`` emulate another screen first."""
        if width is not None and height is not None:
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=2 if mobile else 1, mobile=mobile)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                self.call("Browser.close")
            except (OSError, ConnectionError, RuntimeError):
                pass
            ws.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
