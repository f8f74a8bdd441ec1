"""Session affinity: learned-entry tables (idle expiry, first writer wins, LRU bound) and sealed cookies."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from lbnode.affinity import (
    OLDER_KEYS,
    AffinityTable,
    CookieKeyring,
    CookieSealer,
    MemoryAffinityTable,
    load_older_keys,
    load_or_create_key,
    save_older_keys,
    set_cookie_header,
)

KEY = bytes(range(32))


def test_memory_table_is_an_affinity_table() -> None:
    table: AffinityTable = MemoryAffinityTable(idle_timeout=60, max_entries=10)
    assert len(table) == 0


def test_entry_expires_after_idle_time_and_use_refreshes_it() -> None:
    table = MemoryAffinityTable(idle_timeout=60, max_entries=10)
    table.put_if_absent("s1", "b1", now=0)
    assert table.get("s1", now=59) == "b1"  # refreshed at 59
    assert table.get("s1", now=118) == "b1"  # 59 s idle: still there
    assert table.get("s1", now=178) is None  # 60 s idle: gone
    assert len(table) == 0
    assert table.evictions == 0  # expiry is not an eviction


def test_first_writer_wins() -> None:
    table = MemoryAffinityTable(idle_timeout=60, max_entries=10)
    assert table.put_if_absent("s1", "b1", now=0) == "b1"
    assert table.put_if_absent("s1", "b2", now=1) == "b1"
    assert table.get("s1", now=2) == "b1"


def test_an_expired_entry_does_not_block_a_new_writer() -> None:
    table = MemoryAffinityTable(idle_timeout=10, max_entries=10)
    table.put_if_absent("s1", "b1", now=0)
    assert table.put_if_absent("s1", "b2", now=10) == "b2"


def test_replace_moves_a_session_when_its_backend_is_down() -> None:
    table = MemoryAffinityTable(idle_timeout=60, max_entries=10)
    table.put_if_absent("s1", "b1", now=0)
    table.replace("s1", "b2", now=1)
    assert table.get("s1", now=2) == "b2"
    table.delete("s1")
    table.delete("never-there")
    assert table.get("s1", now=3) is None


def test_size_bound_evicts_least_recently_used_and_counts() -> None:
    table = MemoryAffinityTable(idle_timeout=600, max_entries=3)
    for n, key in enumerate(["a", "b", "c"]):
        table.put_if_absent(key, f"b-{key}", now=n)
    assert table.get("a", now=3) == "b-a"  # a is now the most recently used
    table.put_if_absent("d", "b-d", now=4)  # evicts b
    assert len(table) == 3
    assert table.evictions == 1
    assert table.get("b", now=5) is None
    assert [table.get(k, now=5) for k in ("a", "c", "d")] == ["b-a", "b-c", "b-d"]


def test_idle_entries_are_dropped_on_insert_before_evicting_live_ones() -> None:
    table = MemoryAffinityTable(idle_timeout=10, max_entries=2)
    table.put_if_absent("old", "b1", now=0)
    table.put_if_absent("live", "b2", now=5)
    table.put_if_absent("new", "b3", now=12)  # "old" expired at 10: dropped, not evicted
    assert table.evictions == 0
    assert table.expirations == 1
    assert table.get("live", now=13) == "b2"


# --------------------------------------------------------------------------- cookies


def test_cookie_round_trip_is_cookie_safe() -> None:
    sealer = CookieSealer(KEY)
    value = sealer.seal("192.0.2.1:8080", expires=1000.0)
    assert all(c.isalnum() or c in "-_" for c in value)
    assert sealer.open(value, now=999.0) == "192.0.2.1:8080"
    assert sealer.seal("192.0.2.1:8080", expires=1000.0) != value  # fresh nonce each time


def test_tampered_cookie_is_refused() -> None:
    sealer = CookieSealer(KEY)
    value = sealer.seal("web-1", expires=1000.0)
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    for pos in range(len(raw)):  # every byte: version, nonce, ciphertext, tag
        flipped = bytearray(raw)
        flipped[pos] ^= 0x01
        tampered = base64.urlsafe_b64encode(bytes(flipped)).rstrip(b"=").decode()
        assert sealer.open(tampered, now=0.0) is None
    assert sealer.open(value[:-1], now=0.0) is None  # truncated


def test_expired_cookie_is_refused() -> None:
    sealer = CookieSealer(KEY)
    assert sealer.open(sealer.seal("web-1", expires=100.0), now=100.0) is None


def test_cookie_sealed_under_another_key_is_refused() -> None:
    value = CookieSealer(os.urandom(32)).seal("web-1", expires=1000.0)
    assert CookieSealer(KEY).open(value, now=0.0) is None


@pytest.mark.parametrize("garbage", ["", "x", "!!!!", "é", "AAAA" * 20, "A" * 5, "%00", "a b"])
def test_garbage_cookie_is_refused_without_raising(garbage: str) -> None:
    assert CookieSealer(KEY).open(garbage, now=0.0) is None


def test_wrong_key_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CookieSealer(b"short")


def test_a_keyring_that_follows_another_seals_and_opens_as_it_does() -> None:
    """A worker's keyring takes the supervisor's ``keys()`` (current first): it seals under the
    current key, opens cookies sealed under every key the supervisor replaced, and keeps the
    keys it held itself before (its own cookies still open). Keys held twice are held once."""
    own, first, second, third = (bytes([n]) * 32 for n in (1, 2, 3, 4))
    supervisor = CookieKeyring(own)
    supervisor.switch(first)
    supervisor.switch(second)
    assert supervisor.keys() == [second, first, own]
    worker = CookieKeyring(own)
    sealed_by_worker = worker.seal("w", 100.0)
    sealed_first = CookieSealer(first).seal("f", 100.0)
    assert worker.follow(supervisor.keys()) is True
    assert worker.key == second and worker.keys() == [second, own, first]
    assert CookieSealer(second).open(worker.seal("b", 100.0), 0.0) == "b"
    assert worker.open(sealed_first, 0.0) == "f" and worker.open(sealed_by_worker, 0.0) == "w"
    assert worker.follow(supervisor.keys()) is False  # nothing new: nothing changes
    assert worker.keys() == [second, own, first]
    supervisor.switch(third)
    assert worker.follow(supervisor.keys()) is True
    assert worker.keys() == [third, second, own, first]
    assert worker.open(CookieSealer(third).seal("t", 100.0), 0.0) == "t"
    with pytest.raises(ValueError, match="32 bytes"):
        worker.follow([b"short", second])
    assert worker.key == third  # a bad key changes nothing
    with pytest.raises(ValueError, match="at least one key"):
        worker.follow([])


def test_a_key_switched_back_to_is_held_once() -> None:
    a, b = bytes([1]) * 32, bytes([2]) * 32
    ring = CookieKeyring(a)
    assert ring.switch(b) and ring.switch(a)
    assert ring.keys() == [a, b]


def test_a_keyring_opens_with_the_last_older_keys_replaced_and_no_more() -> None:
    """Each rotation adds a replaced key; past OLDER_KEYS the oldest goes (memory, and the keys
    an unknown cookie is tried against, stay bounded), by ``switch`` and by ``follow`` alike."""
    keys = [bytes([n]) * 32 for n in range(1, OLDER_KEYS + 4)]
    sealed = {k: CookieSealer(k).seal(str(n), 100.0) for n, k in enumerate(keys)}
    ring = CookieKeyring(keys[0])
    for k in keys[1:]:
        ring.switch(k)
    assert ring.keys() == keys[::-1][: OLDER_KEYS + 1]
    kept = keys[-(OLDER_KEYS + 1):]
    assert [ring.open(sealed[k], 0.0) for k in keys] == [None] * (len(keys) - len(kept)) + [
        str(keys.index(k)) for k in kept]
    worker = CookieKeyring(bytes([99]) * 32)
    worker.follow(ring.keys())
    assert len(worker.keys()) == OLDER_KEYS + 1 and worker.key == keys[-1]
    assert worker.open(sealed[keys[-1]], 0.0) == str(len(keys) - 1)


def test_replaced_keys_saved_come_back_in_a_new_keyring(tmp_path: Path) -> None:
    """What ``save_older_keys`` wrote (mode 0600) ``load_older_keys`` reads back, newest first,
    at most OLDER_KEYS; a new keyring opens with them and holds its own key once."""
    keys = [bytes([n]) * 32 for n in range(1, OLDER_KEYS + 3)]
    assert load_older_keys(tmp_path) == []
    save_older_keys(tmp_path, keys)
    assert stat.S_IMODE((tmp_path / "cookie.key.older").stat().st_mode) == 0o600
    assert load_older_keys(tmp_path) == keys[:OLDER_KEYS]
    ring = CookieKeyring(keys[1], load_older_keys(tmp_path))
    assert ring.keys() == [keys[1], keys[0], *keys[2:OLDER_KEYS]]
    assert ring.open(CookieSealer(keys[0]).seal("b", 100.0), 0.0) == "b"
    save_older_keys(tmp_path, [])
    assert load_older_keys(tmp_path) == []


def test_a_file_of_older_keys_that_holds_no_key_is_refused_naming_the_line(tmp_path: Path) -> None:
    (tmp_path / "cookie.key.older").write_text(f"{KEY.hex()}\nnot-a-key\n")
    with pytest.raises(ValueError, match=r"cookie.key.older: line 2 is not 64 hex digits"):
        load_older_keys(tmp_path)


def test_set_cookie_header() -> None:
    assert set_cookie_header("FULCRUM", "v", ttl=3600, tls=False) == (
        "FULCRUM=v; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"
    )
    assert set_cookie_header("FULCRUM", "v", ttl=3600, tls=True).endswith("; SameSite=Lax; Secure")


def test_cookie_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = load_or_create_key(state)
    assert len(key) == 32
    path = state / "cookie.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(state) == key
    assert [p.name for p in state.iterdir()] == ["cookie.key"]


def test_corrupt_cookie_key_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "cookie.key").write_text("not hex")
    with pytest.raises(ValueError, match=r"cookie\.key.*delete the file"):
        load_or_create_key(tmp_path)


def test_sealer_nonces_never_repeat_and_the_prefix_changes_when_the_counter_wraps() -> None:
    import base64

    from lbnode.affinity import CookieSealer

    sealer = CookieSealer(bytes(range(32)))

    def nonce_of(value: str) -> bytes:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        return raw[1:13]

    nonces = {nonce_of(sealer.seal("b1", 2e9)) for _ in range(1000)}
    assert len(nonces) == 1000
    sealer._counter = (1 << 32) - 2
    last = sealer.seal("b1", 2e9)
    wrapped = sealer.seal("b1", 2e9)
    assert nonce_of(last)[:8] != nonce_of(wrapped)[:8]  # new random prefix after the wrap
    assert nonce_of(wrapped)[8:] == (1).to_bytes(4, "big")
    assert sealer.open(last, 1e9) == "b1" and sealer.open(wrapped, 1e9) == "b1"


def test_a_returning_cookie_is_decrypted_once_and_still_expires() -> None:
    from lbnode.affinity import CookieSealer, Stickiness
    from lbnode.model import Affinity

    key = bytes(range(32))
    stickiness = Stickiness(Affinity(mode="cookie", ttl=10.0), key, None)
    value = CookieSealer(key).seal("b1", 100.0)
    calls = []
    real_unseal = stickiness.sealer.unseal  # type: ignore[union-attr]
    stickiness.sealer.unseal = lambda v: calls.append(v) or real_unseal(v)  # type: ignore[union-attr,method-assign]
    headers = {"cookie": f"FULCRUM={value}"}.get
    assert [stickiness.remembered("ip", headers, 0.0, 50.0)[0] for _ in range(3)] == ["b1"] * 3
    assert len(calls) == 1  # opened once, then served from the cache
    assert stickiness.remembered("ip", headers, 0.0, 100.0)[0] is None  # expired: the cache checks it
    tampered = {"cookie": f"FULCRUM={value[:-2]}xx"}.get
    assert stickiness.remembered("ip", tampered, 0.0, 50.0)[0] is None
    assert stickiness.remembered("ip", tampered, 0.0, 50.0)[0] is None
    assert len(calls) == 3  # a forged value is never cached
