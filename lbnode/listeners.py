"""A process's listeners as slots that change at runtime: serve a listener on a socket,
swap its settings on the same socket, stop it; what a reload, a takeover and (later) a
worker process do with the listening sockets they hold.

Owns the socket's life (one slot per socket, closed only by a stop) and each handler's
scope: a replaced handler stops accepting and finishes its connections within
drain_timeout while the new one accepts from the same kernel queue, so no connection is
refused. Building a handler is the caller's (``Build``); this module never reads the
snapshot or the node.
"""

from __future__ import annotations

import logging
import socket as stdsocket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from lbnode.listen import ConnectionGate, Handler, accept_loop, accept_pending
from lbnode.model import Listener
from lbnode.reloadplan import socket_key

log = logging.getLogger("lbnode")

# A listener's handler chain and what to tell its parts when they are replaced or removed
# (an HTTP proxy stops keep-alive), built by the node for a slot (its socket and gate).
Build = Callable[[Listener, "ListenerSlot"], tuple[Handler, list[Callable[[], None]]]]


@dataclass(eq=False, slots=True)
class ListenerSlot:
    """One listening socket and the settings accepting on it now.

    ``accepting`` is the scope of the handler accepting now; the ones before it finish their
    connections and end. ``closing``: stopped (removed, or the process stops); the handler
    that stops accepting then takes what is queued and closes the socket."""

    listener: Listener
    sock: stdsocket.socket
    gate: ConnectionGate
    accepting: trio.CancelScope = field(default_factory=trio.CancelScope)
    closing: bool = False
    retire: list[Callable[[], None]] = field(default_factory=list)


class ListenerSet:
    """The slots of one process, keyed by ``reloadplan.socket_key``; their handlers run in the
    nursery given to ``run`` (open while the process serves)."""

    def __init__(self, build: Build, node_gate: ConnectionGate, drain_timeout: Callable[[], float]) -> None:
        self._build = build
        self._node_gate = node_gate  # [node] max_connections: every listener's gate answers to it
        self._drain_timeout = drain_timeout
        self.slots: dict[str, ListenerSlot] = {}
        self.nursery: trio.Nursery | None = None
        self.stopping = False  # the process drains: a cut connection is its drain's, logged once by it
        self.drain_cut = False  # a drain deadline closed connections still in flight

    def serve(self, li: Listener, sock: stdsocket.socket) -> ListenerSlot:
        """Accept connections for ``li`` on ``sock`` (bound by the caller, or handed over)."""
        slot = ListenerSlot(li, sock, ConnectionGate(li.max_connections, parent=self._node_gate))
        self._start(slot, li)
        return slot

    def swap(self, key: str, li: Listener) -> ListenerSlot:
        """New settings on a slot's socket: the new handler accepts, the previous one stops
        accepting and finishes its connections (a connection that arrives in between waits
        in the kernel's queue, it is not refused)."""
        slot = self.slots.pop(key)
        previous, retire_previous = slot.accepting, slot.retire
        slot.gate.set_limit(li.max_connections)  # the gate counts the old handler's connections too
        self._start(slot, li)
        previous.cancel()
        for retire in retire_previous:
            retire()
        return slot

    def stop(self, key: str) -> ListenerSlot:
        """Stop accepting, take what is queued, close the socket; connections finish within drain_timeout."""
        slot = self.slots.pop(key)
        slot.closing = True
        slot.accepting.cancel()
        for retire in slot.retire:
            retire()
        return slot

    def stop_all(self) -> None:
        """The process drains: every slot stops (the nursery ends once their connections have)."""
        self.stopping = True
        for slot in self.slots.values():
            slot.closing = True
            slot.accepting.cancel()

    def _start(self, slot: ListenerSlot, li: Listener) -> None:
        assert self.nursery is not None, "ListenerSet: serve while the nursery is open"
        handler, retire = self._build(li, slot)
        slot.listener, slot.retire = li, retire
        slot.accepting = accepting = trio.CancelScope()
        self.slots[socket_key(li.name, li.bind)] = slot
        self.nursery.start_soon(self._accept, slot, handler, accepting, li.name)

    async def _accept(self, slot: ListenerSlot, handler: Handler, accepting: trio.CancelScope, name: str) -> None:
        """One handler on a slot's socket: accept until ``accepting`` is cancelled, then (the
        slot closing and this its last handler) take the queue and close the socket; then let
        the connections finish within drain_timeout."""
        async with trio.open_nursery() as connections:
            with accepting:
                await accept_loop(slot.sock, handler, connections, slot.gate, name)
            if slot.closing and slot.accepting is accepting:
                await accept_pending(slot.sock, handler, connections, slot.gate)
                slot.sock.close()
            connections.cancel_scope.deadline = trio.current_time() + self._drain_timeout()
        if connections.cancel_scope.cancelled_caught:
            self.drain_cut = True
            if not self.stopping:
                log.warning("listener %s: connections of its previous settings closed at drain_timeout (%gs)",
                            name, self._drain_timeout())
