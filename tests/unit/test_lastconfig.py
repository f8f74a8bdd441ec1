"""The configuration cache in state_dir: format, validation, mode 0600, coalesced atomic writes."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import trio

from lbnode.cluster.lastconfig import COALESCE, FILE_NAME, CacheError, LastConfig, decode, encode
from lbnode.cluster.store import CertificateRecord, PoolRecord
from lbnode.model import Address, Affinity, Backend, HealthCheck, Pool
from lbnode.tls.certs import load_certificate


def pool(name: str, *ports: int, **settings: object) -> Pool:
    return Pool(name=name, backends=tuple(Backend(Address("127.0.0.1", p)) for p in ports), **settings)  # type: ignore[arg-type]


def records(*pools: Pool, revision: int = 7) -> dict[str, PoolRecord]:
    return {p.name: PoolRecord(p, revision) for p in pools}


def test_round_trip_keeps_every_pool_setting_the_revision_and_the_save_time() -> None:
    full = pool("web", 8001, 8002, algorithm="least_connections", retries=2, connect_ejection=0.5,
                affinity=Affinity(mode="cookie", key=bytes(range(32))), health=HealthCheck(type="http", path="/h"))
    data = encode(records(full, pool("api", 9001)), 42, 1764842400.5)
    document = json.loads(data)
    assert document["format"] == 1 and document["revision"] == 42 and [p["spec"]["name"] for p in document["pools"]] == ["api", "web"]
    cached = decode(data, "x.json")
    assert cached.revision == 42 and cached.saved_at == 1764842400.5
    assert cached.saved_at_iso == "2025-12-04T10:00:00Z"
    assert {r.pool.name: r.pool for r in cached.pools} == {"web": full, "api": pool("api", 9001)}


def test_sections_a_later_version_adds_are_ignored_a_newer_format_is_refused() -> None:
    document = json.loads(encode(records(pool("web", 8001)), 3, 1.0))
    document["vips"] = [{"address": "a.example"}]  # ("certificates" and "routes" are known now: tested below)
    assert [r.pool.name for r in decode(json.dumps(document).encode(), "f").pools] == ["web"]
    document["format"] = 2
    with pytest.raises(CacheError, match=r"f: format 2 is not 1"):
        decode(json.dumps(document).encode(), "f")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: "{not json", r"c\.json: not valid JSON"),
        (lambda d: {**d, "revision": "7"}, r"c\.json: revision: expected an integer"),
        (lambda d: {**d, "pools": {}}, r"c\.json: pools: expected a list"),
        (lambda d: {**d, "pools": [{"spec": d["pools"][0]["spec"]}]}, r"c\.json: pools\[0\]: expected \{revision, spec\}"),
        (lambda d: {**d, "pools": [{"revision": 1, "spec": {"name": "web", "algorithm": "fastest"}}]},
         r"c\.json: pools\[0\]\.spec\.algorithm"),
        (lambda d: {**d, "pools": d["pools"] * 2}, r'c\.json: pools\[1\]: pool "web" appears twice'),
    ],
)
def test_a_bad_cache_is_refused_naming_the_file_and_the_key(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    document = json.loads(encode(records(pool("web", 8001)), 3, 1.0))
    bad = mutate(document)
    with pytest.raises(CacheError, match=message):
        decode(bad.encode() if isinstance(bad, str) else json.dumps(bad).encode(), "c.json")


def test_a_cache_written_under_another_cluster_prefix_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / FILE_NAME).write_bytes(encode(records(pool("web", 8001)), 3, 1.0, "/other/v1"))
    assert LastConfig(tmp_path, prefix="/other/v1").load() is not None
    with caplog.at_level(logging.ERROR, "lbnode.cluster"):
        assert LastConfig(tmp_path, prefix="/fulcrum/v1").load() is None
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(tmp_path / FILE_NAME) in error and "'/other/v1'" in error and "'/fulcrum/v1'" in error


def test_load_of_a_corrupt_file_is_one_logged_error_and_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = LastConfig(tmp_path)
    assert cache.load() is None  # no file: nothing to say
    assert caplog.records == []
    (tmp_path / FILE_NAME).write_bytes(b'{"format": 1, "revision": 3, "saved_at": 1.0, "pools": [{"revision": 1')
    with caplog.at_level(logging.ERROR, "lbnode.cluster"):
        assert cache.load() is None
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert str(tmp_path / FILE_NAME) in errors[0] and "not valid JSON" in errors[0] and "ignored" in errors[0]


async def test_a_burst_of_changes_is_one_write_of_the_newest_mode_0600_and_a_stop_flushes(tmp_path: Path) -> None:
    os.umask(0o022)
    cache = LastConfig(tmp_path, wall=lambda: 1000.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.run)
        for port in range(8001, 8021):  # 20 changes in one go, as a 20-pool `lbctl apply` arrives
            cache.note(records(pool("web", port)), port)
        await trio.sleep(COALESCE * 3)  # margin: the write happens COALESCE after the first change
        assert cache.writes == 1
        loaded = cache.load()
        assert loaded is not None and loaded.revision == 8020 and loaded.pools[0].pool == pool("web", 8020)
        assert stat.S_IMODE((tmp_path / FILE_NAME).stat().st_mode) == 0o600
        assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]  # no temp file left behind
        cache.note(records(pool("web", 9000)), 9000)
        nursery.cancel_scope.cancel()  # the node stops inside the coalescing window
    assert cache.writes == 2
    loaded = cache.load()
    assert loaded is not None and loaded.revision == 9000


async def test_a_write_that_fails_is_logged_once_and_the_next_change_writes_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    cache = LastConfig(state)  # the directory does not exist: every write fails
    with caplog.at_level(logging.WARNING, "lbnode.cluster"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.run)
            cache.note(records(pool("web", 8001)), 1)
            await trio.sleep(COALESCE * 3)
            cache.note(records(pool("web", 8002)), 2)
            await trio.sleep(COALESCE * 3)
            assert cache.writes == 0
            warnings = [r.getMessage() for r in caplog.records if "cannot write the configuration cache" in r.getMessage()]
            assert len(warnings) == 1 and str(state / FILE_NAME) in warnings[0]
            state.mkdir()
            cache.note(records(pool("web", 8003)), 3)
            await trio.sleep(COALESCE * 3)
            assert cache.writes == 1
            nursery.cancel_scope.cancel()
    loaded = cache.load()
    assert loaded is not None and loaded.revision == 3


# --------------------------------------------------------------------------- certificates


def store_certificate(name: str, revision: int = 5) -> CertificateRecord:
    from tests.tlsgen import make_ca, make_leaf

    leaf = make_leaf(make_ca(), [f"{name}.example.com"])
    return CertificateRecord(load_certificate(name, leaf.cert_pem, leaf.key_pem), revision)


def test_the_store_certificates_are_cached_with_their_keys_and_validated_on_read() -> None:
    www = store_certificate("www")
    data = encode(records(pool("web", 8001)), 9, 1.0, certificates={"www": www})
    cached = decode(data, "x.json")
    assert cached.certificates == (www,)  # chain, key and revision: a cold start can serve it
    document = json.loads(data)
    document["certificates"][0]["certificate"]["key"] = store_certificate("other").certificate.key_pem.decode()
    with pytest.raises(CacheError) as refused:
        decode(json.dumps(document).encode(), "x.json")
    assert 'certificates[0] ("www")' in str(refused.value)
    assert "PRIVATE KEY" not in str(refused.value)  # a bad entry is named, its key never shown


def test_a_cache_written_before_certificates_were_cached_still_reads() -> None:
    document = json.loads(encode(records(pool("web", 8001)), 3, 1.0))
    del document["certificates"]
    assert decode(json.dumps(document).encode(), "x.json").certificates == ()


def test_the_store_routes_are_cached_as_their_tables_and_parsed_again_on_read() -> None:
    from lbnode.cluster.store import RouteRecord
    from lbnode.model import route_from_dict

    api = route_from_dict({"name": "api", "path_prefix": "/api/", "split": [{"pool": "v1", "weight": 95},
                                                                          {"pool": "v2", "weight": 5}], "sticky": True})
    routes = {("public", "api"): RouteRecord("public", api, 9)}
    document = json.loads(encode(records(pool("v1", 8001)), 9, 1.0, routes=routes))
    assert document["routes"] == [{"listener": "public", "revision": 9, "spec": dict(api.spec)}]
    cached = decode(json.dumps(document).encode(), "c.json")
    assert cached.routes == (RouteRecord("public", api, 9),)
    assert cached.routes[0].route.split is not None and cached.routes[0].route.split.cookie == "FULCRUM_SPLIT_api"
    document["routes"][0]["spec"]["path_regex"] = "(a+)+$"
    with pytest.raises(CacheError, match=r"c\.json: routes\[0\]\.spec\.path_regex"):
        decode(json.dumps(document).encode(), "c.json")
    # A cache without the section (older, or written before routes were read) keeps node.toml's.
    assert decode(encode(records(pool("v1", 8001)), 9, 1.0), "c.json").routes is None
