"""ClusterAgent against a real etcd: node keys and leases, death and re-registration, shared health."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from lbnode.cluster.assign import backend_key, checkers_for
from lbnode.cluster.etcd import EtcdConnection
from lbnode.cluster.membership import OBSERVATION_MAX_AGE_WRITES, ClusterAgent
from lbnode.health.state import Observation
from lbnode.model import ClusterSettings
from tests.conftest import free_port
from tests.integration.etcd_helpers import EtcdCluster, etcd_cluster

TTL = 2.0
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def settings(shared_etcd: EtcdCluster) -> ClusterSettings:
    return shared_etcd.settings(prefix=f"/member{next(_prefixes)}", lease_ttl=TTL, health_checkers=2)


@pytest.fixture
def etcd_conn(shared_etcd: EtcdCluster) -> Iterator[EtcdConnection]:
    conn = EtcdConnection(shared_etcd.endpoints)
    yield conn
    conn.close()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> float:
    """Seconds until ``predicate()`` held (fails the test after ``timeout``)."""
    started = trio.current_time()
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return trio.current_time() - started
    raise AssertionError(f"{what} still false after {timeout}s")


async def start_agents(nursery: trio.Nursery, settings: ClusterSettings, *ids: str) -> list[ClusterAgent]:
    agents = [ClusterAgent(settings, node_id, {"addresses": [f"127.0.0.1:{8000 + i}"]}, refresh_interval=60)
              for i, node_id in enumerate(ids)]
    for agent in agents:
        await nursery.start(agent.run)
    for agent in agents:
        def sees_all(agent: ClusterAgent = agent) -> bool:
            return agent.live_nodes == set(ids)

        await eventually(sees_all, what=f"{agent.node_id} sees every node")
    return agents


def observation(backend_id: str, ok: bool, reason: str = "") -> Observation:
    return Observation(backend_id, ok, reason or ("status 200" if ok else "connection refused"), trio.current_time())


def backend_checked_by(wanted: set[str], live: list[str], pool: str = "web") -> str:
    """A backend id whose k=2 checkers among ``live`` are exactly ``wanted``."""
    for i in range(1000):
        backend_id = f"198.18.0.{i}:80"
        if set(checkers_for(backend_key(pool, backend_id), live, 2)) == wanted:
            return backend_id
    raise AssertionError(f"no backend checked by {wanted}")


async def read(conn: EtcdConnection, key: str) -> tuple[dict[str, object] | None, int]:
    kv = await trio.to_thread.run_sync(conn.get, key)
    return (None, 0) if kv is None else (json.loads(kv.value), kv.mod_revision)


async def test_node_key_lives_with_its_lease_and_vanishes_when_the_node_dies(
    settings: ClusterSettings, etcd_conn: EtcdConnection
) -> None:
    async with trio.open_nursery() as nursery:
        a, b, c = await start_agents(nursery, settings, "a", "b", "c")
        info, _ = await read(etcd_conn, a.node_key)
        assert info is not None and info["id"] == "a" and info["addresses"] == ["127.0.0.1:8000"]
        assert {"started", "version"} <= set(info)
        assert a.lease_ok_since is not None and a.lease_lost_at is None
        assert a.lease_expires_at is not None and a.lease_expires_at > trio.current_time()

        backend = backend_checked_by({"a", "b"}, ["a", "b", "c"])
        a.publish(observation(backend, False), "web")
        await eventually(lambda: "a" in b.observations("web", backend), what="b sees a's observation")
        health_key = f"{settings.prefix}/health/web/{backend}/a"

        await trio.sleep(TTL + 1)  # beyond the TTL: the keepalives hold it
        assert (await read(etcd_conn, a.node_key))[0] is not None
        assert b.live_nodes == {"a", "b", "c"}

        left: list[tuple[str, float]] = []
        b.on_leave(lambda node: left.append((node, trio.current_time())))
        died_at = trio.current_time()
        a.stop(revoke=False)  # as if the process died: no revoke, no more keepalives
        gone_in = await eventually(lambda: "a" not in b.live_nodes, timeout=TTL + 2, what="a left b's view")
        print(f"\nFIGURE membership: dead node's key gone from another node's view after {gone_in:.2f} s (TTL {TTL:g} s)")
        assert gone_in <= TTL + 1.0
        assert [node for node, _ in left] == ["a"] and abs(left[0][1] - (died_at + gone_in)) < 0.1
        assert (await read(etcd_conn, a.node_key))[0] is None
        assert (await read(etcd_conn, health_key))[0] is None  # bound to the same lease
        assert "a" not in b.observations("web", backend)

        # a's backends have new checkers; the others keep theirs
        for i in range(200):
            backend_id = f"10.0.1.{i}:80"
            before = checkers_for(backend_key("web", backend_id), ["a", "b", "c"], 2)
            after = b.checkers("web", backend_id)
            assert after == c.checkers("web", backend_id)
            if "a" in before:
                assert sorted(after) == ["b", "c"]
                assert b.assigned("web", backend_id) and c.assigned("web", backend_id)
            else:
                assert after == before
        nursery.cancel_scope.cancel()


async def test_a_stopping_node_revokes_its_lease_and_leaves_at_once(settings: ClusterSettings) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await start_agents(nursery, settings, "a", "b")
        a.stop()
        gone_in = await eventually(lambda: b.live_nodes == {"b"}, timeout=1.0, what="a left")
        print(f"\nFIGURE membership: graceful leave seen after {gone_in * 1000:.0f} ms")
        nursery.cancel_scope.cancel()


async def test_non_checkers_follow_the_majority_of_checkers(
    settings: ClusterSettings, etcd_conn: EtcdConnection
) -> None:
    async with trio.open_nursery() as nursery:
        a, b, c = await start_agents(nursery, settings, "a", "b", "c")
        verdicts: list[tuple[str, str, bool, str]] = []
        c.on_verdict(lambda *v: verdicts.append(v))
        backend = backend_checked_by({"a", "b"}, ["a", "b", "c"])
        assert a.assigned("web", backend) and b.assigned("web", backend) and not c.assigned("web", backend)

        a.publish(observation(backend, True), "web")
        await eventually(lambda: len(verdicts) == 1, what="first verdict")
        assert verdicts[-1][:3] == ("web", backend, True)

        a.publish(observation(backend, False), "web")  # 1 of 2 checkers: not a majority
        await eventually(lambda: c.observations("web", backend).get("a", None) is not None
                         and not c.observations("web", backend)["a"].ok, what="c sees a's failure")
        b.publish(observation(backend, False, "timeout after 1s while connecting"), "web")
        await eventually(lambda: len(verdicts) == 2, what="down verdict")
        pool, backend_id, up, reason = verdicts[-1]
        assert (pool, backend_id, up) == ("web", backend, False)
        assert reason.startswith("down on 2 of 2 checkers") and "a: connection refused" in reason
        assert "b: timeout after 1s while connecting" in reason
        assert c.verdict("web", backend) is False

        # the same result again and again is not written again (only changes, or every refresh_interval)
        _, revision = await read(etcd_conn, f"{settings.prefix}/health/web/{backend}/a")
        for _ in range(20):
            a.publish(observation(backend, False), "web")
            await trio.sleep(0.005)
        await trio.sleep(0.2)
        assert (await read(etcd_conn, f"{settings.prefix}/health/web/{backend}/a"))[1] == revision

        a.publish(observation(backend, True), "web")  # split vote: up for the cluster
        await eventually(lambda: len(verdicts) == 3, what="up verdict")
        assert verdicts[-1][2] is True
        # checkers get no verdicts for what they check themselves
        assert not [v for v in verdicts if v[1] != backend]
        nursery.cancel_scope.cancel()


async def test_a_checker_that_falls_silent_while_its_node_lives_is_ignored_after_its_age_limit(
    settings: ClusterSettings, etcd_conn: EtcdConnection
) -> None:
    refresh = 0.3  # writes every 0.3 s while checking: readers drop a silent one after 0.9 s
    async with trio.open_nursery() as nursery:
        agents = [ClusterAgent(settings, n, {"addresses": []}, refresh_interval=refresh) for n in ("a", "b", "c")]
        for agent in agents:
            await nursery.start(agent.run)
        a, b, c = agents
        await eventually(lambda: all(x.live_nodes == {"a", "b", "c"} for x in agents), what="all see all")
        backend = backend_checked_by({"a", "b"}, ["a", "b", "c"])
        verdicts: list[tuple[str, str, bool, str]] = []
        c.on_verdict(lambda *v: verdicts.append(v))
        a.publish(observation(backend, True), "web")  # a's checker says up once, then never again
        stop_b = trio.Event()

        async def b_checks() -> None:  # b's checker goes on: down, every 0.1 s
            while not stop_b.is_set():
                b.publish(observation(backend, False), "web")
                await trio.sleep(0.1)

        nursery.start_soon(b_checks)
        await eventually(lambda: "a" in c.observations("web", backend) and "b" in c.observations("web", backend),
                         what="c sees both")
        a_key = f"{settings.prefix}/health/web/{backend}/a"
        _, a_revision = await read(etcd_conn, a_key)
        assert verdicts and verdicts[-1][2] is True  # split vote while a speaks: up
        silent_since = c.observations("web", backend)["a"].seen
        took = await eventually(lambda: verdicts[-1][2] is False, timeout=10, what="down once a is silent")
        dropped_after = trio.current_time() - silent_since
        print(f"\nsilent checker ignored {dropped_after:.2f}s after its last write "
              f"(limit {OBSERVATION_MAX_AGE_WRITES} x {refresh}s, looked at every {refresh}s)")
        # Its bound: 3 writes' time, plus one sweep (refresh), plus 0.5 s for 2 busy cores.
        assert OBSERVATION_MAX_AGE_WRITES * refresh <= dropped_after < (OBSERVATION_MAX_AGE_WRITES + 1) * refresh + 0.5
        assert took > 0
        reason = verdicts[-1][3]
        assert reason.startswith("down on 1 of 1 checkers") and "silent, ignored: a" in reason
        assert c.verdict("web", backend) is False
        # a's node lives: its key is still there, and was never refreshed without a new result
        value, revision = await read(etcd_conn, a_key)
        assert value is not None and revision == a_revision
        # a speaks again: counted again at once (split vote: up)
        a.publish(observation(backend, True), "web")
        await eventually(lambda: verdicts[-1][2] is True, what="up again when a speaks")
        assert not c.assigned("web", backend)
        # Both fall silent: no verdict is left, so c checks the backend itself (as a node
        # without a lease does) and tells its checkers to re-filter; once one speaks, it stops.
        reassigned: list[bool] = []
        c.on_assignment_change(lambda: reassigned.append(c.assigned("web", backend)))
        stop_b.set()
        await eventually(lambda: c.assigned("web", backend), timeout=10, what="c covers for its silent checkers")
        assert reassigned and reassigned[-1] is True
        b.publish(observation(backend, False), "web")
        await eventually(lambda: not c.assigned("web", backend), what="c stops covering when b speaks")
        assert reassigned[-1] is False
        nursery.cancel_scope.cancel()


async def test_observations_are_refreshed_and_retracted(settings: ClusterSettings, etcd_conn: EtcdConnection) -> None:
    async with trio.open_nursery() as nursery:
        agent = ClusterAgent(settings, "solo", {"addresses": []}, refresh_interval=0.3)
        await nursery.start(agent.run)
        await agent.registered.wait()
        key = f"{settings.prefix}/health/web/b1/solo"
        agent.publish(Observation("b1", True, "status 200", trio.current_time()), "web")
        await eventually(lambda: "solo" in agent.observations("web", "b1"))
        first_at = agent.observations("web", "b1")["solo"].at
        agent.publish(Observation("b1", True, "status 200", trio.current_time()), "web")
        await eventually(lambda: agent.observations("web", "b1")["solo"].at > first_at, timeout=2,
                         what="refreshed after refresh_interval")
        agent.retract("web")
        await eventually(lambda: not agent.observations("web", "b1"), what="retracted")
        assert (await read(etcd_conn, key))[0] is None
        nursery.cancel_scope.cancel()


async def test_lease_lost_while_etcd_is_down_then_registered_again(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path) as etcd:
        settings = etcd.settings(lease_ttl=TTL)
        conn = EtcdConnection(etcd.endpoints)
        changes: list[bool] = []
        async with trio.open_nursery() as nursery:
            a, b = await start_agents(nursery, settings, "a", "b")
            a.on_assignment_change(lambda: changes.append(a.isolated))
            backend = backend_checked_by({"b", "a"}, ["a", "b"])
            a.publish(observation(backend, False), "web")
            await eventually(lambda: "a" in b.observations("web", backend))
            first_lease = a.lease_id
            assert not a.assigned("web", "any-backend") or "a" in a.checkers("web", "any-backend")

            etcd.members[0].kill()
            killed_at = trio.current_time()
            lost_in = await eventually(lambda: a.lease_lost_at is not None, timeout=TTL + 2, what="lease lost")
            print(f"\nFIGURE membership: lease declared lost {lost_in:.2f} s after etcd died (TTL {TTL:g} s)")
            assert a.lease_expires_at is not None and a.lease_lost_at >= a.lease_expires_at - 0.05  # type: ignore[operator]
            assert a.isolated and changes[-1] is True
            # without a lease the node checks every backend itself (static stability)
            assert all(a.assigned("web", f"10.9.0.{i}:80") for i in range(50))
            assert b.live_nodes == {"a", "b"}  # etcd unreachable: the last view is kept

            await trio.to_thread.run_sync(etcd.members[0].start)
            restarted_at = trio.current_time()
            back_in = await eventually(lambda: a.lease_id is not None and a.lease_id != first_lease,
                                       timeout=10, what="registered again")
            print(f"FIGURE membership: registered again {back_in:.2f} s after etcd restarted "
                  f"(down {restarted_at - killed_at:.2f} s)")
            assert a.lease_lost_at is None and a.lease_ok_since is not None and changes[-1] is False
            kv = await trio.to_thread.run_sync(conn.get, a.node_key)
            assert kv is not None and kv.lease == a.lease_id
            # its observation is written again under the new lease
            async def health_lease() -> int:
                kv = await trio.to_thread.run_sync(conn.get, f"{settings.prefix}/health/web/{backend}/a")
                return 0 if kv is None else kv.lease

            with trio.fail_after(5):
                while await health_lease() != a.lease_id:
                    await trio.sleep(0.05)
            await eventually(lambda: b.live_nodes == {"a", "b"} and "a" in b.observations("web", backend),
                             timeout=10, what="b sees a again")
            nursery.cancel_scope.cancel()
        conn.close()


async def test_unreachable_etcd_never_blocks_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "lbnode.cluster")
    settings = ClusterSettings(etcd=(f"http://127.0.0.1:{free_port()}",), lease_ttl=TTL)
    agent = ClusterAgent(settings, "lonely", {"addresses": []})
    async with trio.open_nursery() as nursery:
        with trio.fail_after(0.5):
            await nursery.start(agent.run)
        agent.publish(Observation("b1", False, "connection refused", trio.current_time()), "web")
        await trio.sleep(2.0)
        assert agent.isolated and agent.assigned("web", "b1") and agent.live_nodes == frozenset()
        registering = [r for r in caplog.records if "cannot register" in r.getMessage()]
        assert len(registering) == 1, [r.getMessage() for r in caplog.records]
        started = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started < 1.0


async def test_a_second_node_with_the_same_id_is_refused_until_the_first_is_gone(
    settings: ClusterSettings, etcd_conn: EtcdConnection, caplog: pytest.LogCaptureFixture
) -> None:
    first = ClusterAgent(settings, "twin", {"addresses": ["192.0.2.1:80"], "host": "h1", "state_dir": "/s"})
    second = ClusterAgent(settings, "twin", {"addresses": ["192.0.2.2:80"], "host": "h2", "state_dir": "/s"})
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await eventually(lambda: first.lease_id is not None, what="first registered")
        with caplog.at_level(logging.ERROR, logger="lbnode.cluster"):
            await nursery.start(second.run)
            await trio.sleep(TTL + 0.5)  # past the first's keepalives: still its key
        assert second.lease_id is None
        info, _ = await read(etcd_conn, first.node_key)
        assert info is not None and info["host"] == "h1"
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("node id 'twin' is registered in etcd by another live node (host h1" in m
                   and "every node needs its own [node] id" in m for m in errors), errors
        first.stop()  # the first leaves: the second gets the id (after its retry backoff)
        await eventually(lambda: second.lease_id is not None, timeout=8, what="second registered")
        info, _ = await read(etcd_conn, second.node_key)
        assert info is not None and info["host"] == "h2"
        nursery.cancel_scope.cancel()


async def test_a_restarted_node_takes_its_key_back_at_once_from_its_dead_run(
    settings: ClusterSettings, etcd_conn: EtcdConnection
) -> None:
    identity = {"addresses": ["192.0.2.1:80"], "host": "h1", "state_dir": "/s"}
    old = ClusterAgent(settings, "phoenix", identity)
    async with trio.open_nursery() as nursery:
        await nursery.start(old.run)
        await eventually(lambda: old.lease_id is not None, what="registered")
        old_lease = old.lease_id
        old.stop(revoke=False)  # a crash: its key lives on with its lease for up to the TTL
        await trio.sleep(0.1)
        new = ClusterAgent(settings, "phoenix", identity)
        await nursery.start(new.run)
        took = await eventually(lambda: new.lease_id is not None, timeout=TTL / 2, what="restart registered")
        assert new.lease_id != old_lease
        kvs, _ = await trio.to_thread.run_sync(etcd_conn.get_prefix, new.node_key)
        assert [kv.lease for kv in kvs] == [new.lease_id]
        print(f"\nFIGURE membership: a restarted node registered {took * 1000:.0f} ms after starting "
              f"(its dead run's lease revoked)")
        nursery.cancel_scope.cancel()
