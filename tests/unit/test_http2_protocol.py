"""The pure half of HTTP/2 (lbnode.http2.protocol) and its config keys: no sockets, no clock."""

from __future__ import annotations

import pytest
from h2.events import RemoteSettingsChanged
from h2.settings import SettingCodes

from lbnode.config import load_config_text
from lbnode.http.headers import BadRequest, ResponseHead, check_request, upstream_request_head
from lbnode.http2.protocol import (
    WALK_EVERY,
    TokenBucket,
    grpc_local_answer,
    is_grpc,
    new_connection,
    request_head,
    response_fields,
)
from lbnode.model import ConfigFileError, Http2Settings

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.example:8443"), (b":path", b"/p?q=1")]


def test_request_head_takes_host_from_authority_and_joins_cookies() -> None:
    head = request_head([*BASE, (b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")], end_stream=True)
    check_request(head)
    assert (head.method, head.target, head.host, head.path, head.query) == (b"GET", b"/p?q=1", "a.example", "/p", "q=1")
    sent = upstream_request_head(head, "192.0.2.1", "https", "fulcrum")
    assert sent.startswith(b"GET /p?q=1 HTTP/1.1\r\nhost: a.example:8443\r\n")
    assert b"cookie: a=1; b=2\r\n" in sent and b"Via: 2 fulcrum\r\n" in sent
    assert not head.has_body


def test_a_body_of_unknown_length_goes_chunked_and_a_known_one_keeps_its_length() -> None:
    head = request_head([*BASE[:1], *BASE[1:]], end_stream=False)
    check_request(head)
    assert head.chunked and b"Transfer-Encoding: chunked\r\n" in upstream_request_head(head, "192.0.2.1", "https", "f")
    head = request_head([*BASE, (b"content-length", b"5")], end_stream=False)
    check_request(head)
    assert head.content_length == 5 and not head.chunked


def test_conflicting_host_connect_and_missing_authority_are_refused() -> None:
    with pytest.raises(BadRequest, match="different hosts"):
        request_head([*BASE, (b"host", b"b.example")], True)
    with pytest.raises(BadRequest) as exc:
        request_head([(b":method", b"CONNECT"), (b":authority", b"a.example:443")], True)
    assert exc.value.status == 405
    with pytest.raises(BadRequest, match="missing :authority"):
        request_head([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")], True)


def test_response_fields_drop_connection_specific_ones() -> None:
    resp = ResponseHead(200, b"OK", "1.1", [(b"Content-Type", b"text/plain"), (b"Connection", b"close, x-secret"),
                                            (b"Keep-Alive", b"timeout=5"), (b"X-Secret", b"1"), (b"Via", b"1.1 fulcrum")],
                        False, connection_tokens=frozenset({b"close", b"x-secret"}))
    assert response_fields(resp) == [(b":status", b"200"), (b"content-type", b"text/plain"), (b"via", b"1.1 fulcrum")]


def test_node_answers_to_grpc_calls_are_grpc_statuses() -> None:
    assert is_grpc([(b"content-type", b"application/grpc+proto")]) and not is_grpc([(b"content-type", b"text/html")])
    fields = dict(grpc_local_answer(503, "no backend available in pool api"))
    assert fields[b":status"] == b"200" and fields[b"grpc-status"] == b"14"
    assert fields[b"grpc-message"] == b"no backend available in pool api"
    assert dict(grpc_local_answer(504, "x"))[b"grpc-status"] == b"4"
    assert dict(grpc_local_answer(429, "x"))[b"grpc-status"] == b"8"
    assert dict(grpc_local_answer(418, "100%\n"))[b"grpc-message"] == b"100%25%0A"  # percent-encoded


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.05) is False  # half a token
    assert bucket.take(100.15) is True  # 0.15 s at 10/s: one more


def test_new_connection_announces_the_listeners_settings() -> None:
    settings = Http2Settings(enabled=True, max_concurrent_streams=7, initial_window=1 << 20, max_frame_size=1 << 15,
                             max_header_list_size=8192)
    server = new_connection(settings)
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    events = client.receive_data(server.data_to_send())
    changed = next(e for e in events if isinstance(e, RemoteSettingsChanged)).changed_settings
    assert changed[SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 7
    assert changed[SettingCodes.INITIAL_WINDOW_SIZE].new_value == 1 << 20
    assert changed[SettingCodes.MAX_FRAME_SIZE].new_value == 1 << 15
    assert changed[SettingCodes.MAX_HEADER_LIST_SIZE].new_value == 8192
    assert client.outbound_flow_control_window == 4 << 20  # the connection window: 4 streams' worth


def test_the_open_stream_count_refuses_exactly_where_h2s_walk_would() -> None:
    """OpenStreamsBound keeps an upper bound instead of walking every stream per new one: the
    stream beyond h2's limit (twice the announced 5) is still refused exactly there, after
    streams opened and closed in any order, and the closed ones are forgotten."""
    import h2.exceptions
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    server = new_connection(Http2Settings(enabled=True, max_concurrent_streams=5))
    client = H2Connection(H2Configuration(client_side=True))  # (not told the server's limit)
    client.initiate_connection()
    sid = 1

    def open_one() -> int:
        nonlocal sid
        stream_id, sid = sid, sid + 2
        client.send_headers(stream_id, BASE, end_stream=True)
        server.receive_data(client.data_to_send())
        return stream_id

    def close(stream_id: int) -> None:  # the server answers it in full: closed both ways
        server.send_headers(stream_id, [(b":status", b"204")], end_stream=True)

    # 200 streams opened and closed one after another (past several walks), 3 left open.
    for _ in range(200):
        close(open_one())
    for _ in range(3):
        open_one()
    # h2 is told twice the announced limit: 7 more are taken (10 open)...
    more = [open_one() for _ in range(7)]
    assert server._open_streams(1) == 10
    # ...one closes, and exactly one more fits again: the next is one too many.
    close(more[0])
    open_one()
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        open_one()
    # With the default limit (100, so 200 for h2) closed streams are still forgotten every
    # WALK_EVERY new streams, long before the bound nears the limit.
    server = new_connection(Http2Settings(enabled=True))
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    sid = 1
    for _ in range(300):
        close(open_one())
        assert len(server.streams) <= WALK_EVERY + 1


LISTENER = '[node]\nid = "n"\n[[pools]]\nname = "p"\n[[pools.backends]]\naddress = "127.0.0.1:1"\n' \
           '[[listeners]]\nname = "l"\nprotocol = "{protocol}"\nbind = "127.0.0.1:0"\npool = "p"\n{extra}'




def test_config_keys_defaults_and_errors_naming_the_key() -> None:
    on = load_config_text(LISTENER.format(protocol="http", extra="[listeners.http2]\nenabled = true\n"
                                          "max_concurrent_streams = 50\ninitial_window = 1048576\n"))
    h2 = on.listeners[0].http2
    assert h2 is not None and h2.max_concurrent_streams == 50 and h2.initial_window == 1 << 20
    assert h2.max_header_list_size == 64 * 1024  # the listener's max_header_bytes
    assert load_config_text(LISTENER.format(protocol="http", extra="")).listeners[0].http2 is None  # h2c: asked for
    with pytest.raises(ConfigFileError, match=r"listeners\[0\]\.http2\.initial_window"):
        load_config_text(LISTENER.format(protocol="http", extra="[listeners.http2]\ninitial_window = 1000\n"))
    with pytest.raises(ConfigFileError, match=r"listeners\[0\]\.http2\.max_frame_size"):
        load_config_text(LISTENER.format(protocol="http", extra="[listeners.http2]\nmax_frame_size = 100\n"))
    with pytest.raises(ConfigFileError, match=r"listeners\[0\]\.http2\.bogus"):
        load_config_text(LISTENER.format(protocol="http", extra="[listeners.http2]\nbogus = 1\n"))
    with pytest.raises(ConfigFileError, match='needs protocol = "http" or "https"'):
        load_config_text(LISTENER.format(protocol="tcp", extra="[listeners.http2]\nenabled = true\n"))


def test_pool_protocol_h2_takes_tls_but_not_send_proxy() -> None:
    pool = '[node]\nid = "n"\n[[pools]]\nname = "p"\nprotocol = "{}"\n{}[[pools.backends]]\naddress = "127.0.0.1:1"\n'
    assert load_config_text(pool.format("h2", "")).pools[0].protocol == "h2"
    assert load_config_text(pool.format("http1", "")).pools[0].protocol == "http1"
    over_tls = load_config_text(pool.format("h2", '[pools.tls]\nenabled = true\nserver_name = "api.internal"\n')).pools[0]
    assert over_tls.protocol == "h2" and over_tls.tls is not None and over_tls.tls.server_name == "api.internal"
    with pytest.raises(ConfigFileError, match=r"pools\[0\]\.protocol"):
        load_config_text(pool.format("h3", ""))
    with pytest.raises(ConfigFileError, match=r'pools\[0\]\.send_proxy: is not supported with protocol = "h2"'):
        load_config_text(pool.format("h2", 'send_proxy = "v2"\n'))
