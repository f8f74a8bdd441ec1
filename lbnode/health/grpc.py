"""gRPC health checks (``[pools.health] type = "grpc"``): grpc.health.v1.Health/Check over
cleartext HTTP/2, as Kubernetes' and Envoy's gRPC probes.

Owns one probe's exchange on a connected stream (h2's state machine driven by hand) and the
few protobuf bytes of HealthCheckRequest and HealthCheckResponse (one field each, so no
generated code). The caller owns the connection and the timeout.
"""

from __future__ import annotations

import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived
from h2.exceptions import ProtocolError

CHECK_PATH = b"/grpc.health.v1.Health/Check"
RECEIVE_BYTES = 16 * 1024
# HealthCheckResponse.ServingStatus
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
# A health answer is a few bytes: more than this is not one.
MAX_ANSWER_BYTES = 64 * 1024


def check_request(service: str) -> bytes:
    """A length-prefixed HealthCheckRequest naming ``service`` ("" = the whole server)."""
    name = service.encode()
    message = b"\x0a" + _varint(len(name)) + name if name else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def serving_status(body: bytes) -> int | None:
    """The status of a length-prefixed HealthCheckResponse (None: not one)."""
    if len(body) < 5 or body[0] != 0:
        return None
    message = body[5:5 + int.from_bytes(body[1:5], "big")]
    if not message:
        return 0  # proto3 leaves a zero field out: UNKNOWN
    if message[0] != 0x08:
        return None
    value, shift = 0, 0
    for byte in message[1:]:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    return None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def grpc_check(stream: trio.abc.Stream, authority: str, service: str) -> tuple[bool, str]:
    """One Check call; passes when the answer is SERVING."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", authority.encode()), (b":path", CHECK_PATH),
        (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"user-agent", b"fulcrum-health"),
    ])
    conn.send_data(sid, check_request(service), end_stream=True)
    await stream.send_all(conn.data_to_send())
    fields: dict[bytes, bytes] = {}
    body = b""
    while True:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            return False, "connection closed before the answer"
        try:
            events = conn.receive_data(data)
        except ProtocolError as exc:
            return False, f"not an HTTP/2 answer: {exc}"
        ended = False
        for event in events:
            if isinstance(event, (ResponseReceived, TrailersReceived)):
                fields.update(event.headers)
            elif isinstance(event, DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, StreamReset):
                return False, f"the backend reset the call ({event.error_code!r})"
            elif isinstance(event, StreamEnded):
                ended = True
        out = conn.data_to_send()
        if out:
            await stream.send_all(out)
        if ended:
            break
        if len(body) > MAX_ANSWER_BYTES:
            return False, "answer too large for a health check"
    if fields.get(b":status") != b"200":
        return False, f"HTTP status {fields.get(b':status', b'?').decode()}"
    code = fields.get(b"grpc-status", b"?")
    if code != b"0":
        message = fields.get(b"grpc-message", b"").decode("utf-8", "replace")
        if code == b"12":
            return False, "the backend has no grpc.health.v1 service (UNIMPLEMENTED)"
        if code == b"5":
            return False, f"service {service!r} unknown to the backend (NOT_FOUND)"
        return False, f"grpc-status {code.decode()}: {message}"
    status = serving_status(body)
    if status is None:
        return False, "not a HealthCheckResponse"
    name = SERVING_STATUS.get(status, str(status))
    return status == 1, name
