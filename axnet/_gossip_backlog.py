"""The state backlog: peers' push-pull states waiting to be merged.

A large table must not stall gossip.  The core hands us a peer's push-pull
state in the middle of a stream; a task decodes it in a thread and merges it
``MERGE_CHUNK`` records at a time, so probes are answered meanwhile.  Merges
commute (the newer version wins), so their order against broadcasts does not
matter.  States wait in a bounded queue: push-pull repeats, so a state
dropped now comes again at that peer's next one.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import trio

from ._daemon import Record
from ._wire import Decoded, WireError, records_from_state

log = logging.getLogger("axnet.gossip")

#: Push-pull states waiting to be merged at most; past it the oldest is
#: dropped (and counted): the next push-pull with that peer brings it again.
MAX_PENDING_STATES = 4
#: Records merged between two checkpoints: a push-pull of 100 000 records
#: takes seconds to merge, and probes must be answered meanwhile.
MERGE_CHUNK = 2000


class StateBacklog:
    """States queued by :meth:`put` and merged, oldest first, by :meth:`run`.

    The backlog decodes and paces; what a record means is the owner's
    business: *merge* takes each chunk of records (the cluster filters and
    merges them into the table), *count_dropped* each decoded state's
    undecodable records.
    """

    def __init__(
        self,
        *,
        merge: Callable[[list[Record]], None],
        count_dropped: Callable[[Decoded], None],
    ) -> None:
        self._merge = merge
        self._count_dropped = count_dropped
        #: States to merge, oldest first.
        self._states: collections.deque[bytes] = collections.deque()
        self._ready = trio.Event()
        #: States received, and states merged or dropped, so far.
        self._in = self._out = 0
        self._state_out = trio.Event()
        #: States dropped unmerged, MAX_PENDING_STATES already waiting.
        self.dropped = 0
        #: States that did not decode at all.
        self.malformed = 0

    def put(self, data: bytes) -> None:
        """Queue a peer's push-pull state; the oldest goes if MAX_PENDING_STATES wait."""
        self._in += 1
        if len(self._states) >= MAX_PENDING_STATES:
            self._states.popleft()
            self.dropped += 1
            self._state_done()
        self._states.append(data)
        self._ready.set()

    async def wait_merged(self) -> None:
        """Return once every push-pull state received so far is merged (or dropped)."""
        received = self._in
        while self._out < received:
            await self._state_out.wait()

    def _state_done(self) -> None:
        self._out += 1
        self._state_out.set()
        self._state_out = trio.Event()

    async def run(self) -> None:
        """Merge states as they come, until cancelled."""
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            while self._states:
                try:
                    await self._merge_state(self._states.popleft())
                finally:
                    self._state_done()

    async def _merge_state(self, data: bytes) -> None:
        try:
            # In a thread: the loop gets the interpreter back every few ms.
            decoded = await trio.to_thread.run_sync(
                records_from_state, data, abandon_on_cancel=True
            )
        except WireError as exc:
            self.malformed += 1
            log.debug("dropped malformed push-pull state reason=%s", exc)
            return
        self._count_dropped(decoded)
        records = decoded.records
        for start in range(0, len(records), MERGE_CHUNK):
            if start:
                await trio.sleep(0)
            self._merge(records[start : start + MERGE_CHUNK])


__all__ = [
    "MAX_PENDING_STATES",
    "MERGE_CHUNK",
    "StateBacklog",
]
