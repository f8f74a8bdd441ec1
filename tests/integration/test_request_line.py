"""Request lines the node must not pass on as they are: versions it does not speak (505, never
forwarded) and absolute-form targets (forwarded in origin-form with the target's authority as
the one Host). Raw sockets through a real node to a backend that echoes the bytes it received."""

from __future__ import annotations

import trio

from tests.conftest import listener_toml, node_toml, pool_toml, raw_exchange, start_node


class EchoBackend:
    """Answers every request with the exact bytes of its head as the body; counts requests."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            self.heads.append(head)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(head), head)
            )


async def _node(nursery: trio.Nursery, *pools: tuple[str, EchoBackend], routes: str = "") -> int:
    toml = node_toml(
        listener_toml("web", "http", pools[0][0], extra=routes),
        *(pool_toml(name, [f"127.0.0.1:{b.port}"]) for name, b in pools),
    )
    _, bound = await start_node(nursery, toml)
    return bound.listeners["web"][1]


def _status_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


async def test_http_2_0_and_other_versions_get_505_and_reach_no_backend(nursery: trio.Nursery) -> None:
    echo = EchoBackend()
    await nursery.start(echo.serve)
    port = await _node(nursery, ("web", echo))
    for version in (b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"):
        data = await raw_exchange(port, b"GET / " + version + b"\r\nHost: a.example\r\n\r\n")
        assert _status_line(data) == b"HTTP/1.1 505 HTTP Version Not Supported", (version, data)
        assert b"not supported (HTTP/1.0 and HTTP/1.1 are)" in data
    assert echo.heads == []  # never forwarded
    ok = await raw_exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    assert _status_line(ok) == b"HTTP/1.1 200 OK" and len(echo.heads) == 1


async def test_an_absolute_form_target_reaches_the_backend_in_origin_form_with_its_authority_as_host(
    nursery: trio.Nursery,
) -> None:
    web, api = EchoBackend(), EchoBackend()
    await nursery.start(web.serve)
    await nursery.start(api.serve)
    routes = '[[listeners.routes]]\nhost = "a.example"\npool = "api"\n'
    port = await _node(nursery, ("web", web), ("api", api), routes=routes)
    data = await raw_exchange(port, b"GET http://a.example/x?y=1 HTTP/1.1\r\nHost: b.example\r\nAccept: */*\r\n\r\n")
    assert _status_line(data) == b"HTTP/1.1 200 OK"
    # Routed by the target's authority (a.example -> api), not by Host (b.example -> web).
    assert web.heads == [] and len(api.heads) == 1
    received = api.heads[0]
    assert received.startswith(b"GET /x?y=1 HTTP/1.1\r\n")
    lines = received.split(b"\r\n")
    assert [line for line in lines if line.lower().startswith(b"host:")] == [b"Host: a.example"]
    assert b"b.example" not in received  # the two never disagree downstream
    assert b"Accept: */*" in lines and b"X-Forwarded-Host: a.example" in lines
    # An origin-form request with Host: b.example goes where b.example goes.
    data = await raw_exchange(port, b"GET /z HTTP/1.1\r\nHost: b.example\r\n\r\n")
    assert _status_line(data) == b"HTTP/1.1 200 OK" and len(web.heads) == 1
    assert [ln for ln in web.heads[0].split(b"\r\n") if ln.lower().startswith(b"host:")] == [b"Host: b.example"]


async def test_an_absolute_form_target_with_user_info_is_400_and_not_forwarded(nursery: trio.Nursery) -> None:
    echo = EchoBackend()
    await nursery.start(echo.serve)
    port = await _node(nursery, ("web", echo))
    data = await raw_exchange(port, b"GET http://user@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert _status_line(data) == b"HTTP/1.1 400 Bad Request" and echo.heads == []


