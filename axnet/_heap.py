"""Keep CPython's cyclic garbage collector off a large service table.

A full collection walks every object the collector tracks, with the GIL
held.  A table of 200 000 services holds about 1.2 million of them (each
record, its addresses, its labels), and walking them takes about 0.4 s on
the development VM: in the daemon that stalls probes and acks, in a
supervisor every trapped socket call of its app (the native hot path needs
the GIL too).

Records are immutable and hold no cycles, so the collector has nothing to
find among them: reference counting frees a record as soon as a newer one
replaces it.  So once records a quarter of the table's size (and at least
MIN_RECORDS) have come in since the last time, :meth:`Settler.merged`
moves everything alive into the collector's permanent generation
(``gc.freeze()``), which full collections skip; objects that die later are
still freed by reference counting.  A table that grows or churns leaves at
most a quarter of itself to walk.  Garbage is collected before each freeze
(a walk of what is not frozen yet: as long as one of the collector's own
full collections would take); what a freeze cannot free is a cycle alive at
that moment that dies later, and a freeze comes once per quarter of the
table merged.
"""

from __future__ import annotations

import gc

#: No freeze before this many records came in: small tables collect in microseconds.
MIN_RECORDS = 10_000


def freeze_startup() -> None:
    """Freeze what a process holds once started (its modules, mostly: about
    25 000 objects in a supervisor, whose full collection took 33 ms): it
    lives as long as the process.  Called once, before the event loop runs."""
    gc.freeze()


class Settler:
    """Freezes the heap once enough records came in since the last time."""

    def __init__(self, min_records: int = MIN_RECORDS) -> None:
        self._min = min_records
        self._since = 0

    def merged(self, count: int, size: int) -> bool:
        """*count* records came into a table that now holds *size*; whether
        the heap was frozen."""
        self._since += count
        if self._since < max(self._min, size // 4):
            return False
        gc.collect()  # walks only what is not frozen yet
        gc.freeze()
        self._since = 0
        return True
