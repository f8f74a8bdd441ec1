"""The node's recent-events ring (EventHub.recent) and how the status page words each event."""

from __future__ import annotations

from lbnode.admin.page import event_entry
from lbnode.control.events import BackendHealthChange, EventHub, NodeChange, PoolChange, VipMove


def test_recent_keeps_the_last_events_oldest_first_without_subscribers():
    hub = EventHub(recent=3)
    for i in range(5):
        hub.publish(NodeChange(f"n{i}", "joined"))
    recent = hub.recent()
    assert [p.event.node_id for p in recent] == ["n2", "n3", "n4"]  # type: ignore[union-attr]
    assert [p.seq for p in recent] == [3, 4, 5]


def test_recent_is_a_copy_a_later_publish_does_not_change():
    hub = EventHub(recent=2)
    hub.publish(NodeChange("a", "joined"))
    before = hub.recent()
    hub.publish(NodeChange("b", "left"))
    assert len(before) == 1 and len(hub.recent()) == 2


def test_each_kind_is_worded_with_its_subject():
    hub = EventHub()
    hub.publish(BackendHealthChange("web", "app-1", "up", "down", "connection refused"))
    hub.publish(PoolChange("web", "deleted", None, 42))
    hub.publish(VipMove("192.0.2.10", "n1", None))
    hub.publish(VipMove("192.0.2.11", None, "n2"))
    entries = [event_entry(p) for p in hub.recent()]
    assert [(e["kind"], e["subject"], e["detail"]) for e in entries] == [
        ("health", "web/app-1", "up -> down: connection refused"),
        ("pool", "web", "deleted (revision 42)"),
        ("vip", "192.0.2.10", "n1 -> free"),
        ("vip", "192.0.2.11", "free -> n2"),
    ]
    assert all(isinstance(e["time"], float) and e["seq"] > 0 for e in entries)
