"""The access log's line formats and the X-Request-Id rules (pure: entries in, text out), and its
writer on real files (/dev/full for a failing disk)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from lbnode.accesslog import (
    MAX_TARGET,
    AccessLogWriter,
    Entry,
    ListenerAccessLog,
    combined_line,
    json_line,
)
from lbnode.http.headers import RequestHead, check_request, client_request_id, upstream_request_head
from lbnode.model import AccessLog

WALL = datetime(2026, 12, 4, 9, 5, 3, 250_000, tzinfo=UTC).timestamp()


def entry(**fields: object) -> Entry:
    e = Entry(WALL, 100.0, "http", "192.0.2.7", 40000)
    for k, v in fields.items():
        setattr(e, k, v)
    return e


def test_json_line_has_every_field_and_escapes_what_clients_send() -> None:
    e = entry(method=b"GET", target=b'/a"b\\c?\xe9', version="1.1", host="h.example", status=200,
              bytes_in=10, bytes_out=20, duration=0.0123456, backend_time=0.001, pool="web", backend="b1",
              attempts=2, user_agent=b"ua\x01\n", request_id=b"id-1")
    line = json_line(e, "front")
    assert line.endswith("}\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "time": "2026-12-04T09:05:03.250Z", "listener": "front", "protocol": "http", "client_ip": "192.0.2.7",
        "client_port": 40000, "method": "GET", "host": "h.example", "path": '/a"b\\c?\u00e9', "version": "1.1",
        "status": 200, "bytes_in": 10, "bytes_out": 20, "duration_ms": 12.346, "backend_ms": 1.0, "pool": "web",
        "backend": "b1", "retries": 1, "reason": None, "request_id": "id-1", "user_agent": "ua\u0001\n",
        "referer": None, "tls_version": None, "sni": None,
    }
    assert line.isascii()


def test_long_fields_are_cut() -> None:
    e = entry(method=b"GET", target=b"/" + b"x" * 100_000, version="1.1", user_agent=b"u" * 100_000)
    doc = json.loads(json_line(e, "front"))
    assert len(doc["path"]) == MAX_TARGET and len(doc["user_agent"]) == 1024
    assert len(combined_line(e, "front")) < MAX_TARGET + 1024 + 200


def test_combined_line_escapes_as_apache() -> None:
    e = entry(method=b"GET", target=b"/x y", version="1.0", status=404, bytes_out=0,
              referer=b'say "hi"\\', user_agent=b"caf\xe9\x7f")
    assert combined_line(e, "front") == (
        '192.0.2.7 - - [04/Dec/2026:09:05:03 +0000] "GET /x y HTTP/1.0" 404 - '
        '"say \\"hi\\"\\\\" "caf\\xe9\\x7f"\n'
    )
    assert combined_line(entry(status=400, bytes_out=90), "front") == (
        '192.0.2.7 - - [04/Dec/2026:09:05:03 +0000] "-" 400 90 "-" "-"\n')


def test_full_buffer_drops_and_counts() -> None:
    log = ListenerAccessLog("front", AccessLog(path="-", buffer=2))
    for _ in range(5):
        log.add(entry())
    assert len(log.entries) == 2 and log.dropped == 3


def head(*fields: tuple[bytes, bytes]) -> RequestHead:
    h = RequestHead(b"GET", b"/", "1.1", [(b"Host", b"h"), *fields], True, False)
    check_request(h)
    return h


def test_client_request_id_rules() -> None:
    assert client_request_id(head()) == (None, False)
    assert client_request_id(head((b"X-Request-Id", b"abc"))) == (b"abc", True)
    assert client_request_id(head((b"x-request-id", b" Root=1-a;Parent=2 "))) == (b"Root=1-a;Parent=2", True)
    assert client_request_id(head((b"X-Request-Id", b"x" * 200))) == (b"x" * 200, True)
    for bad in (b"x" * 201, b"a b", b'a"b', b"a\\b", b"caf\xe9", b""):
        assert client_request_id(head((b"X-Request-Id", bad))) == (None, True), bad
    assert client_request_id(head((b"X-Request-Id", b"a"), (b"X-Request-Id", b"b"))) == (None, True)


def test_upstream_head_drops_the_fields_it_is_told_to() -> None:
    h = head((b"X-Request-Id", b"a b"), (b"Accept", b"*/*"))
    out = upstream_request_head(h, "192.0.2.1", "http", "fulcrum", b"X-Request-Id: new\r\n",
                                frozenset({b"x-request-id"}))
    assert b"a b" not in out and out.count(b"X-Request-Id") == 1 and b"X-Request-Id: new\r\n" in out
    assert b"Accept: */*\r\n" in out
    kept = upstream_request_head(h, "192.0.2.1", "http", "fulcrum")
    assert b"X-Request-Id: a b\r\n" in kept


# --------------------------------------------------------------------------- the writer, on real files


async def test_a_failed_write_counts_its_entries_as_dropped(caplog) -> None:  # type: ignore[no-untyped-def]
    log = ListenerAccessLog("front", AccessLog(path="/dev/full"))
    writer = AccessLogWriter("/dev/full", [log])  # every write: ENOSPC, as a full disk
    writer.open()
    try:
        log.add(entry())
        log.add(entry())
        await writer.flush()
        assert (log.written, log.dropped, log.entries) == (0, 2, [])
        assert "access log /dev/full: write failed (No space left on device)" in caplog.text
    finally:
        writer.close()


async def test_reopen_writes_to_the_new_file_and_a_failed_reopen_keeps_the_old(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "access.log"
    log = ListenerAccessLog("front", AccessLog(path=str(path)))
    writer = AccessLogWriter(str(path), [log])
    writer.open()
    try:
        log.add(entry(status=1))
        await writer.flush()
        path.rename(logs / "access.log.1")
        writer.reopen()
        log.add(entry(status=2))
        await writer.flush()
        assert [json.loads(x)["status"] for x in (logs / "access.log.1").read_text().splitlines()] == [1]
        assert [json.loads(x)["status"] for x in path.read_text().splitlines()] == [2]
        # the directory is gone: the reopen fails, the lines go on to the file still open
        logs.rename(tmp_path / "moved")
        writer.reopen()
        log.add(entry(status=3))
        await writer.flush()
        assert "cannot reopen (No such file or directory)" in caplog.text
        assert [json.loads(x)["status"] for x in (tmp_path / "moved" / "access.log").read_text().splitlines()] == [2, 3]
        assert (log.written, log.dropped, writer.reopens) == (3, 0, 2)
    finally:
        writer.close()
