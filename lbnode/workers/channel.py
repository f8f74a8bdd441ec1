"""One Unix socket pair between the supervisor and a worker: framed messages, and the
listening sockets passed along them (SCM_RIGHTS).

A frame is a 4-byte body length, a 1-byte message type and a JSON body. Descriptors ride
with a frame's first byte (one ``sendmsg``); the receiver keeps every descriptor that
arrives and hands them to the frame that says how many it carries (``"fds"`` in its
body), so a frame split over several reads still gets its own. Sends go through one lock:
two tasks never interleave their frames.
"""

from __future__ import annotations

import array
import json
import os
import socket as stdsocket
import struct
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import trio

HEADER = struct.Struct("!IB")
# A configuration with a few thousand backends and its certificates is well under this;
# a longer frame means the stream is out of step, which is a bug to report, not to read.
MAX_FRAME = 64 * 1024 * 1024
# Descriptors one frame may carry: a node's listeners (the kernel's own cap is 253).
MAX_FDS = 253
RECV_SIZE = 256 * 1024


class Kind(IntEnum):
    """Message types; the direction is in the name's comment."""

    HELLO = 1  # supervisor -> worker: who it is, the config file, the listening sockets (fds)
    CONFIG = 2  # supervisor -> worker: pools and certificates to serve, with a version
    HEALTH = 3  # supervisor -> worker: backends' health (and ejections) as the supervisor sees them
    DRAIN = 4  # supervisor -> worker: stop accepting, finish what is in flight, exit
    COUNTERS = 5  # both ways: a request (supervisor) and its answer (worker), matched by "id"
    READY = 6  # worker -> supervisor: serving on every listener
    OBSERVATION = 7  # worker -> supervisor: what only the data path sees (learned affinity entries)
    AFFINITY = 8  # supervisor -> worker: affinity entries that stand, entries etcd deleted, keys in use elsewhere
    RELOAD = 9  # supervisor -> worker: node.toml as reloaded, its configuration, the added listeners' sockets (fds)
    RELOADED = 10  # worker -> supervisor: a RELOAD applied (or why not), matched by "id"
    COOKIE_KEY = 11  # supervisor -> worker: the cluster's cookie keys (current first), when they change
    TICKET_KEY = 12  # supervisor -> worker: the TLS session ticket key every worker uses, when it changes


class ChannelError(Exception):
    """The peer sent something that is not a frame of this protocol."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    body: dict[str, Any]
    fds: list[int] = field(default_factory=list)


def encode(kind: Kind, body: dict[str, Any]) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return HEADER.pack(len(data), kind) + data


class Channel:
    """Frames over a connected AF_UNIX stream socket (one end of a ``socketpair``)."""

    def __init__(self, sock: stdsocket.socket) -> None:
        sock.setblocking(False)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._send_lock = trio.Lock()
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    async def send(self, kind: Kind, body: dict[str, Any], fds: list[int] | None = None) -> None:
        if fds:
            body = {**body, "fds": len(fds)}
        frame = encode(kind, body)
        async with self._send_lock:
            if fds:
                rights = [(stdsocket.SOL_SOCKET, stdsocket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = await self._sock.sendmsg([frame], rights)
                frame = frame[sent:]
            while frame:
                sent = await self._sock.send(frame)
                frame = frame[sent:]

    async def receive(self) -> Message | None:
        """The next message; None when the peer has closed its end."""
        while True:
            message = self._parse()
            if message is not None:
                return message
            data, ancillary, _, _ = await self._sock.recvmsg(RECV_SIZE, stdsocket.CMSG_SPACE(MAX_FDS * 4))
            for level, kind, payload in ancillary:
                if level == stdsocket.SOL_SOCKET and kind == stdsocket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                return None
            self._buffer += data

    def _parse(self) -> Message | None:
        if len(self._buffer) < HEADER.size:
            return None
        length, kind = HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME:
            raise ChannelError(f"frame of {length} bytes (at most {MAX_FRAME})")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        try:
            body = json.loads(self._buffer[HEADER.size:end])
            message_kind = Kind(kind)
        except ValueError as exc:
            raise ChannelError(f"unreadable frame of type {kind}: {exc}") from None
        del self._buffer[:end]
        if not isinstance(body, dict):
            raise ChannelError(f"frame of type {message_kind.name}: body is not a JSON object")
        count = body.get("fds", 0)
        if not isinstance(count, int) or count > len(self._fds):
            raise ChannelError(f"frame of type {message_kind.name} announces {count} descriptors, {len(self._fds)} came")
        fds = [self._fds.popleft() for _ in range(count)]
        return Message(message_kind, body, fds)

    def close(self) -> None:
        self._sock.close()
        while self._fds:  # descriptors received that no frame claimed
            try:
                os.close(self._fds.popleft())
            except OSError:
                pass
