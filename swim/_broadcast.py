"""Transmit-limited broadcast queue (infection-style dissemination).

Theory of operation: every message to disseminate is queued once, already
encoded, under an invalidation key — the member name for alive/suspect/dead,
(origin, key) for an application broadcast — so a newer message about the
same thing replaces the older one instead of travelling beside it. Each time
a message rides on an outgoing packet its transmit count goes up; once it
reaches retransmit_mult * ceil(log10(N + 1)) it is dropped. Packets are
filled with the least-transmitted messages first, newest first among equals
(as memberlist), which spreads fresh news fastest. A message is never put on
a packet to a member known to hold it (`holders`: whoever told us, the
origin), and such a skip costs no transmit nor counts against the scan
limit; a message skipped 3 * limit times is dropped, which bounds the work
skips cost over its life.

Items live in buckets indexed by transmit count, each an insertion-ordered
dict, so queueing, invalidating and taking are O(1) per message touched, not
O(queue length).

The queue holds at most `MAX_QUEUED` messages: past it the one spread
widest (most transmitted), oldest among equals, is dropped, as serf prunes
memberlist's queue.  A member with nobody to send to (the first of a
cluster, or one whose peers are all gone) would otherwise keep every
message of its life, and replay them all to the first member that comes;
push-pull brings whatever a dropped message carried.
"""

from __future__ import annotations

from collections.abc import Hashable

#: Items examined per fill before giving up on finding one that fits.
_SCAN_LIMIT = 256
#: Below this many free bytes no message can fit; stop filling.
_MIN_MESSAGE = 4
#: A message passed over this many times per transmit it may have, because
#: the destination held it, is dropped: nearly every member left to pick
#: holds it (with all of them holders it would otherwise stay for good, and
#: a pile of such messages would keep the scan from the ones owed a send).
#: 3 keeps the reach of never dropping (simulated, five and eight members).
_SKIPS_PER_TRANSMIT = 3
#: Messages queued at most (serf's MinQueueDepth).
MAX_QUEUED = 4096


class _Item:
    __slots__ = ("data", "holders", "id", "key", "skips", "transmits")

    def __init__(
        self, item_id: int, key: Hashable, data: bytes, holders: tuple[Hashable, ...]
    ) -> None:
        self.id = item_id
        self.key = key
        self.data = data
        self.holders = holders
        self.skips = 0
        self.transmits = 0


class BroadcastQueue:
    """Messages waiting to be piggybacked, with invalidation by key."""

    __slots__ = ("_buckets", "_by_key", "_max_queued", "_next_id")

    def __init__(self, max_queued: int = MAX_QUEUED) -> None:
        self._buckets: list[dict[int, _Item]] = [{}]
        self._by_key: dict[Hashable, _Item] = {}
        self._next_id = 0
        self._max_queued = max_queued

    def __len__(self) -> int:
        return len(self._by_key)

    def queue(self, key: Hashable, data: bytes, holders: tuple[Hashable, ...] = ()) -> bool:
        """Queue `data`, replacing any message queued under `key`; whether
        another message was dropped to make room for it.

        `holders` are destinations known to hold it already (whoever told
        us); it never rides on a packet to them, so no transmit is spent
        telling a member what it just told us.
        """
        old = self._by_key.pop(key, None)
        dropped = False
        if old is not None:
            del self._buckets[old.transmits][old.id]
        elif len(self._by_key) >= self._max_queued:
            self._drop_widest()
            dropped = True
        item = _Item(self._next_id, key, data, holders)
        self._next_id += 1
        self._by_key[key] = item
        self._buckets[0][item.id] = item
        return dropped

    def _drop_widest(self) -> None:
        """Drop the message transmitted most, the oldest among equals."""
        for bucket in reversed(self._buckets):
            if bucket:
                item = bucket.pop(next(iter(bucket)))
                del self._by_key[item.key]
                return

    def take(
        self,
        free_bytes: int,
        per_message_overhead: int,
        transmit_limit: int,
        dest: Hashable = None,
    ) -> list[bytes]:
        """Messages for `dest` fitting in `free_bytes`; counts one transmission for each."""
        chosen: list[_Item] = []
        spent: list[_Item] = []
        scanned = 0
        for bucket in self._buckets:
            if free_bytes < _MIN_MESSAGE or scanned >= _SCAN_LIMIT:
                break
            for item in reversed(bucket.values()):
                if dest is not None and dest in item.holders:
                    item.skips += 1
                    if item.skips >= _SKIPS_PER_TRANSMIT * transmit_limit:
                        spent.append(item)
                    continue
                scanned += 1
                cost = len(item.data) + per_message_overhead
                if cost <= free_bytes:
                    chosen.append(item)
                    free_bytes -= cost
                if free_bytes < _MIN_MESSAGE or scanned >= _SCAN_LIMIT:
                    break
        for item in spent:
            del self._buckets[item.transmits][item.id]
            del self._by_key[item.key]
        for item in chosen:
            del self._buckets[item.transmits][item.id]
            item.transmits += 1
            if item.transmits >= transmit_limit:
                del self._by_key[item.key]
                continue
            while len(self._buckets) <= item.transmits:
                self._buckets.append({})
            self._buckets[item.transmits][item.id] = item
        return [item.data for item in chosen]

    def prune(self, transmit_limit: int) -> None:
        """Drop messages already sent `transmit_limit` times (N shrank)."""
        for transmits in range(transmit_limit, len(self._buckets)):
            for item in self._buckets[transmits].values():
                del self._by_key[item.key]
            self._buckets[transmits].clear()
