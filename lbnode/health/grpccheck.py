"""gRPC health checks: ``grpc.health.v1.Health/Check`` over grpcio, one channel per backend address.

Owns the checks' channels (kept from probe to probe, replaced after a failure, closed when the
backend leaves) and turns an answer or an RPC error into ``(passed, reason)``. Never blocks the
Trio thread: the call is grpcio's future, its completion handed to Trio by the future's done
callback; grpcio's deadline bounds the call, the caller's Trio deadline bounds the wait.
"""

from __future__ import annotations

import functools
import re
import ssl
from pathlib import Path

import grpc
import trio
from grpc_health.v1 import health_pb2

from lbnode.model import Address, HealthCheck, PoolTls
from lbnode.tls.upstream import TlsSetupError, backend_tls

CHECK_METHOD = "/grpc.health.v1.Health/Check"
# A Check answer is a few bytes; a backend sending more is not answering a health check.
MAX_ANSWER_BYTES = 64 * 1024
# Reasons quote at most this much of grpcio's error text (it can carry a whole handshake log).
MAX_DETAIL = 200

_Response = health_pb2.HealthCheckResponse
# An RPC error that is the health service's own answer: the connection is sound, keep it.
_ANSWERS = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND})
# "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8443: <what happened>"
_ADDRESS_PREFIX = re.compile(r"^failed to connect to all addresses; last error: (?:[A-Z_]+: )?(?:\S+?: )?")
_OPENSSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)(?:: (.*?))?(?:: OK)?$")


class GrpcChannels:
    """The open channel to each backend address of one checker, with the TLS setting it was made for.

    A channel is kept while its backend answers (one HTTP/2 connection for every check, as a
    client of the backend would keep it), and closed after a failure, so the next probe
    connects afresh instead of inheriting grpcio's reconnect backoff.
    """

    def __init__(self) -> None:
        self._open: dict[Address, tuple[PoolTls | None, grpc.Channel]] = {}

    @property
    def addresses(self) -> list[Address]:
        """The addresses with an open channel (the status of the checks, and tests, read it)."""
        return list(self._open)

    def get(self, address: Address, tls: PoolTls | None) -> grpc.Channel:
        """The channel to ``address``, opened if there is none; raises ``TlsSetupError``."""
        held = self._open.get(address)
        if held is not None and held[0] == tls:
            return held[1]
        self.close(address)  # the pool's [pools.tls] changed: a channel speaks one setting
        channel = _open_channel(address, tls)
        self._open[address] = (tls, channel)
        return channel

    def close(self, address: Address) -> None:
        held = self._open.pop(address, None)
        if held is not None:
            held[1].close()  # cancels a call still in flight; no network wait

    def close_all(self) -> None:
        for address in list(self._open):
            self.close(address)


def _open_channel(address: Address, tls: PoolTls | None) -> grpc.Channel:
    options: list[tuple[str, str | int]] = [
        # A check goes to the backend itself, never through $http_proxy or $grpc_proxy.
        ("grpc.enable_http_proxy", 0),
        # grpcio shares connections, and their reconnect backoff, between all channels of the
        # process to the same address: a new channel beside one that saw a refused connect
        # fails without trying for up to the backoff (1 s, growing to 120 s), although the
        # backend is back. A failed channel is closed (GrpcChannels), and each checker's
        # channels keep their connections to themselves.
        ("grpc.use_local_subchannel_pool", 1),
        # One attempt per probe: a retry inside grpcio would hide a flapping backend.
        ("grpc.enable_retries", 0),
        ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
    ]
    target = str(address)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name is not None:
        # SNI and the name verified, as backend_tls sends them; without it the target's host.
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, _credentials(tls), options=options)


@functools.lru_cache(maxsize=64)
def _credentials(settings: PoolTls) -> grpc.ChannelCredentials:
    """grpcio's form of a ``[pools.tls]``: the same CA, client certificate and key files.

    ``backend_tls`` loads them first, so a file that cannot be used is named exactly as for the
    pool's traffic. Without ``ca`` the system store is OpenSSL's default CA file, the one
    Python's default context loads (grpcio's own bundled roots only where there is none)."""
    backend_tls(settings)
    roots = _read(settings.ca, "ca") if settings.ca else _system_roots()
    chain = _read(settings.cert, "cert") if settings.cert else None
    key = _read(settings.key or settings.cert, "key") if settings.cert else None
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def _read(path: str | None, key: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsSetupError(key, f"cannot read {path}: {(exc.strerror or str(exc)).lower()}") from None


def _system_roots() -> bytes | None:
    cafile = ssl.get_default_verify_paths().cafile
    if cafile is None:
        return None
    try:
        return Path(cafile).read_bytes()
    except OSError:
        return None


async def grpc_check(
    address: Address, check: HealthCheck, tls: PoolTls | None, channels: GrpcChannels
) -> tuple[bool, str]:
    """Ask ``address``'s health service about ``check.service`` once; ``(passed, reason)``.

    Runs under the caller's Trio deadline and raises ``trio.TooSlowError`` when grpcio's own
    deadline (the rest of the caller's) expires first. SERVING passes; any other status, and
    any RPC error, fails with a reason naming it (``grpc status NOT_SERVING``,
    ``grpc error UNIMPLEMENTED: ...``)."""
    try:
        channel = channels.get(address, tls)
    except TlsSetupError as exc:
        return False, f"pools.tls.{exc.key}: {exc.reason}"
    try:
        code, answer, details = await _ask(channel, check)
    except BaseException:  # no answer in time, or the check stopped: the call may be stuck
        channels.close(address)
        raise
    if code is grpc.StatusCode.OK and answer is not None:
        return answer.status == _Response.SERVING, f"grpc status {_status_name(answer.status)}"
    if code not in _ANSWERS:
        channels.close(address)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        raise trio.TooSlowError
    return False, describe_rpc_error(code, details, check.service, tls, address)


async def _ask(channel: grpc.Channel, check: HealthCheck) -> tuple[grpc.StatusCode, _Response | None, str]:
    method = channel.unary_unary(
        CHECK_METHOD,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=_Response.FromString,
    )
    deadline = trio.current_effective_deadline()
    timeout = deadline - trio.current_time() if deadline != float("inf") else check.timeout
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: object) -> None:  # in a grpcio thread, or at once in this one if already done
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    call = method.future(health_pb2.HealthCheckRequest(service=check.service), timeout=max(timeout, 0.0))
    try:
        call.add_done_callback(wake)
        await done.wait()
    finally:
        call.cancel()  # nothing when it is done; otherwise the caller gave up first
    code = call.code()
    if code is grpc.StatusCode.OK:
        return code, call.result(), ""
    return code, None, call.details() or ""


def _status_name(status: int) -> str:
    try:
        return _Response.ServingStatus.Name(status)
    except ValueError:
        return str(status)


def describe_rpc_error(
    code: grpc.StatusCode, details: str, service: str, tls: PoolTls | None, address: Address
) -> str:
    """``grpc error UNAVAILABLE: connection refused`` rather than grpcio's whole error chain."""
    if code is grpc.StatusCode.UNIMPLEMENTED:
        why = "the server has no grpc.health.v1.Health service"
    elif code is grpc.StatusCode.NOT_FOUND:
        why = f'service "{service}" is unknown to the server (SERVICE_UNKNOWN)'
    else:
        why = _describe_details(details, tls, address)
    return f"grpc error {code.name}: {why}"


def _describe_details(details: str, tls: PoolTls | None, address: Address) -> str:
    text = _ADDRESS_PREFIX.sub("", details.strip())
    if "Connection refused" in text:
        return "connection refused"
    if "Hostname Verification Check failed" in text:
        name = (tls.server_name if tls is not None else None) or address.host
        return f"TLS: certificate verify failed: the certificate does not name {name}"
    openssl = _OPENSSL_REASON.search(text)
    if openssl is not None:
        reason, more = openssl.group(1), openssl.group(2)
        if reason == "CERTIFICATE_VERIFY_FAILED":
            return "TLS: certificate verify failed" + (f": {more}" if more else "")
        return f"TLS handshake failed: {reason.lower().replace('_', ' ')}"
    text = text[:1].lower() + text[1:]
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."
