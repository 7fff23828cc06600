"""The change queue: table changes on their way from gossip to the supervisors.

Supervisors must never stall gossip: changes for them go through a queue
that a separate task drains into ``Daemon.changed``.  The driver loop only
queues; it waits for the queue in one place, before datagrams leave (acks
among them), and then ``ACK_HOLD_S`` at most.
"""

from __future__ import annotations

import trio

from ._daemon import Daemon, Record

#: How long datagrams (acks among them) may wait for the changes their
#: events made to be handed to the supervisors here (see
#: ``GossipCluster._drain``): behind a large merge's backlog, a probe's ack
#: must not wait until peers think us dead.
ACK_HOLD_S = 0.05


class ChangeQueue:
    """Changes for ``Daemon.changed``, handed over in order by :meth:`run`.

    A queue and a task rather than a call, so that a slow supervisor never
    holds up the driver loop; counters rather than a join, so that the loop
    waits for what it queued so far and not for what comes after.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._changes: list[tuple[list[Record], bool]] = []
        self._ready = trio.Event()
        #: Changes queued and pushed so far, and an event set at each push.
        self._queued = self._pushed = 0
        self._push_done = trio.Event()

    def put(self, records: list[Record], *, local: bool) -> None:
        """Queue *records* (ours when *local*) for the daemon."""
        self._changes.append((records, local))
        self._queued += 1
        self._ready.set()

    async def run(self) -> None:
        """Hand changes to the daemon (supervisors, and gossip for ours), in order."""
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            changes, self._changes = self._changes, []
            for records, local in changes:
                await self._daemon.changed(records, local=local)
            self._pushed += len(changes)
            self._push_done.set()
            self._push_done = trio.Event()

    async def wait_handed_over(self) -> None:
        """Until every change queued so far has gone to the daemon, ACK_HOLD_S
        at most; at once, without a checkpoint, when none is waiting."""
        if self._pushed < self._queued:
            with trio.move_on_after(ACK_HOLD_S):
                await self._handed_over()

    async def _handed_over(self) -> None:
        queued = self._queued
        while self._pushed < queued:
            await self._push_done.wait()


__all__ = [
    "ACK_HOLD_S",
    "ChangeQueue",
]
