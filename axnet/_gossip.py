"""The gossip cluster: the trio driver of a :class:`swim.Swim` core in the daemon.

Theory of operation
-------------------
The core (``swim/``) decides everything and does no I/O; this module owns the
clock and drives the core, and its transport (:mod:`axnet._gossip_transport`:
one UDP socket and one TCP listener, the framing, the limits that hold peers
in check) owns the sockets and carries bytes in and out:

* Every datagram goes straight into ``Swim.handle_datagram``, every stream a
  peer opens into ``Swim.handle_stream``.  Every input is followed by a
  wake-up of the *driver loop*, which ticks the core when ``next_deadline()``
  is due and drains its outputs: datagrams are sent, stream requests become
  tasks, events are acted on.
* Undecodable or unauthenticated input is counted by the core
  (``swim.Stats``); failed authentication is also logged, at most once per
  source address every ``AUTH_WARNING_INTERVAL_S``, because it almost always
  means a member runs with the wrong ``--gossip-key-file``.
* Service records ride the gossip, as broadcasts and as the push-pull state
  (see :mod:`axnet._gossip_codec`).  A member that dies or leaves takes its
  records with it: every member writes tombstones for them locally
  (``Node.forget_node``) and does not gossip them, since every other member
  does the same.  A member that was declared dead while it was alive (a
  partition) learns it by refuting, or from the tombstones a peer shows it in
  push-pull, and writes its records again above them (``Node.merge_remote``).
  Records of a node that is no member at all (forgotten after its death, then
  brought back by a peer that was partitioned all along) would have no event to
  go with: a sweep withdraws them after ``ORPHAN_GRACE_S``.  Names whose
  records were withdrawn are remembered, and their live records not taken
  again, until they join.
* Supervisors must never stall gossip: changes for them go through a queue
  (:mod:`axnet._gossip_changes`).
* Nor may a large table: a peer's push-pull state waits in a backlog that a
  task merges in chunks (:mod:`axnet._gossip_backlog`).  Our own state packs
  each record once and reuses it while the table holds it.
* Healing.  SWIM alone never talks to a member it declared dead again, so two
  halves of a healed partition would stay apart (memberlist has the same
  property; Serf adds reconnects).  The core reconnects (a push-pull with one
  random failed member every ``reconnect_interval``); and when a member comes
  back to life we push-pull with it (each observer with probability
  ``REVIVAL_SYNC_FANOUT / (N - 1)``) so that it sees the tombstones written
  for it at once.
* Incarnation numbers start from the wall clock in milliseconds, so a
  restarted daemon outranks every incarnation of its previous life (and the
  ``(boot, seq)`` of its broadcasts do too, even when it restarts within the
  same second).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, assert_never

import attrs
import trio

import swim

from ._daemon import Daemon, Record
from ._gossip_address import host_port, parse_address
from ._gossip_backlog import StateBacklog
from ._gossip_changes import ChangeQueue
from ._gossip_codec import decode_meta, encode_meta, encode_record, record_key
from ._gossip_options import PROFILES, GossipOptions
from ._gossip_transport import GossipTransport
from ._heap import Settler
from ._table import IPAddress
from ._wire import Decoded, WireError, pack_packed_array, records_from_wire, unpack

log = logging.getLogger("axnet.gossip")

#: Seconds between two authentication warnings about one source address.
AUTH_WARNING_INTERVAL_S = 10.0
#: Source addresses remembered for that rate limit (the dict is cleared when full).
MAX_WARNED_SOURCES = 1024
#: Keys of records too large to gossip remembered, to warn of each once.
MAX_SAID_TOO_LARGE = 1024
#: Join retries at start: first and largest delay between attempts, seconds.
JOIN_BACKOFF_MIN_S = 1.0
JOIN_BACKOFF_MAX_S = 30.0
#: Seconds ``leave`` waits for the leave broadcast to drain.
LEAVE_PROPAGATE_S = 5.0
#: Reconnect interval = push_pull_interval / this (lan 5 s, local 2.5 s, wan 10 s).
RECONNECT_PER_PUSH_PULL = 6
#: Expected number of members that push-pull with a member that came back to life.
REVIVAL_SYNC_FANOUT = 3
#: Shortest sleep of the driver loop, seconds: a deadline in the past never spins it.
MIN_TICK_S = 0.001
#: Seconds a node's live records are kept while the node is no member at all
#: (never seen, or forgotten after its death).  A joining node's records may
#: arrive a moment before its membership does; past this, no member event will
#: ever withdraw them, so the sweep does.
ORPHAN_GRACE_S = 60.0
#: Seconds between two sweeps for such records.
ORPHAN_SWEEP_S = 15.0
#: Names held gone (see ``GossipCluster._gone``) at most; the oldest fall off,
#: and the sweep withdraws what one of them might still bring back.
MAX_GONE_NAMES = 10_000


@attrs.define
class DriverStats:
    """What the cluster counts (the transport, the state backlog and the core
    count the rest)."""

    records_malformed: int = 0
    #: live records of members held gone (dead, left, or withdrawn as no member), not merged
    records_of_gone: int = 0
    #: nodes whose records were withdrawn because they were no member (see sweep_orphans)
    non_members_withdrawn: int = 0
    records_too_large: int = 0
    revival_syncs: int = 0
    republished: int = 0


class GossipCluster:
    """The daemon's cluster: a SWIM member on UDP + TCP (see the module docstring).

    Implements the daemon's ``Cluster`` protocol, the core's ``StateDelegate``
    and the transport's ``Receiver``.
    """

    def __init__(self, daemon: Daemon, options: GossipOptions) -> None:
        self._daemon = daemon
        self._options = options
        # Reconnects (push-pull with a failed member, in the core) every
        # push-pull interval / RECONNECT_PER_PUSH_PULL: a healed partition
        # reunites within seconds rather than Serf's 30 s.
        base = PROFILES[options.profile]()
        self.config = attrs.evolve(
            base, reconnect_interval=base.push_pull_interval / RECONNECT_PER_PUSH_PULL
        )
        self._keyring = (
            swim.Keyring(options.keys[0], others=options.keys[1:]) if options.keys else None
        )
        self._rng = random.Random()
        self._meta = encode_meta(str(daemon.config.node.real_host), options.labels)
        self._transport = GossipTransport(
            self, bind=options.bind, tcp_timeout=self.config.tcp_timeout
        )
        self._core: swim.Swim | None = None
        self._incarnation = 0
        self._wake = trio.Event()
        self._changes = ChangeQueue(daemon)
        #: Each record in our last push-pull state, packed, by id() (see local_state).
        self._packed: dict[int, tuple[Record, bytes]] = {}
        self._backlog = StateBacklog(merge=self._merge_records, count_dropped=self._count_dropped)
        self._heap = Settler()
        self._nursery: trio.Nursery | None = None
        #: Hosts of every member's gossip address; None: to be rebuilt.
        self._member_hosts: set[str] | None = None
        self._join_requested = 0
        #: Set by leave(): a start-up join still retrying stops.
        self._left = False
        #: Set once the start-up join is over (at once without seeds).
        self._start_join_done = trio.Event()
        #: Gossip addresses of other members that use this node's name.
        self._conflicts: list[str] = []
        self._unresolved: dict[str, str] = {}  # seed -> why the last join could not resolve it
        #: Seeds of the last join that are this node (its own address, or one reaching it).
        self._self_seeds: list[str] = []
        #: Keys of records warned of as too large to gossip.
        self._said_too_large: set[bytes] = set()
        #: Addresses whose stream replies came from this node, since the last join.
        self._answered_by_self: set[swim.Address] = set()
        self._auth_warned: dict[str, float] = {}
        #: Names of failed (dead, not left) members, to notice their revival.
        self._failed: set[str] = set()
        #: Names whose records we withdrew: members that died or left (kept
        #: after the core forgets them) and nodes swept as no member.  Their
        #: live records are not merged until they join again.  Oldest first.
        self._gone: dict[str, None] = {}
        #: Nodes that own live records here without being members: name → since.
        self._orphans: dict[str, float] = {}
        self.driver_stats = DriverStats()
        #: Deliveries under way (see deliver): token → (done, members missing).
        self._deliveries: dict[int, tuple[trio.Event, list[str]]] = {}

    # -- setup -------------------------------------------------------------------------

    @property
    def core(self) -> swim.Swim:
        assert self._core is not None, "GossipCluster.bind() was not called"
        return self._core

    @property
    def address(self) -> swim.Address:
        """The gossip address other members reach us at."""
        return self.core.local_member.address

    async def bind(self) -> None:
        """Open the UDP socket and the TCP listener; GossipError if we cannot.

        A bind port of 0 picks a port free for both (tests).
        """
        port = await self._transport.bind()
        advertise = self._options.advertise
        if advertise[1] == 0:  # "the port we bound"
            advertise = (advertise[0], port)
        self._core = self._new_core(advertise)

    def _new_core(self, advertise: swim.Address) -> swim.Swim:
        # Milliseconds: a restart within the same second still outranks the
        # previous life (see the module docstring).
        incarnation = max(int(time.time() * 1000), self._incarnation + 1)
        self._incarnation = incarnation
        return swim.Swim(
            name=self._daemon.config.node.name,
            address=advertise,
            config=self.config,
            rng=self._rng,
            now=trio.current_time(),
            incarnation=incarnation,
            meta=self._meta,
            delegate=self,
            keyring=self._keyring,
        )

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve gossip until cancelled; ``bind`` first."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._transport.serve)
            nursery.start_soon(self._drive)
            nursery.start_soon(self._changes.run)
            nursery.start_soon(self._backlog.run)
            nursery.start_soon(self._sweep_orphans_forever)
            if self._options.seeds:
                nursery.start_soon(self._join_at_start, self._options.seeds)
            else:
                self._start_join_done.set()
            log.info(
                "gossip ready name=%s bind=%s advertise=%s profile=%s encrypted=%s",
                self.core.name,
                host_port(self._options.bind),
                host_port(self.address),
                self._options.profile,
                self._keyring is not None,
            )
            task_status.started()

    # -- Cluster protocol ----------------------------------------------------------------

    def publish(self, records: Sequence[Record]) -> None:
        self._broadcast(records, direct=False)

    async def deliver(self, records: Sequence[Record]) -> list[str]:
        """Publish *records*, and send them straight to every member alive;
        return once each has acknowledged them (its table has them and they
        went out to its supervisors), or the probe timeout is over.  Returns
        the members that did not answer.  One that missed an earlier
        delivery is not waited for until it answers again.  Gossip carries
        them too."""
        token = self._broadcast(records, direct=True)
        if token is None:
            return []
        done, missing = trio.Event(), list[str]()
        self._deliveries[token] = (done, missing)
        try:
            await done.wait()
        finally:
            del self._deliveries[token]
        return missing

    def _broadcast(self, records: Sequence[Record], *, direct: bool) -> int | None:
        if self.core.leaving:
            # Left: peers dropped our records and would never hear of these
            # again.  They stay in our table; a rejoin's push-pull carries them.
            return None
        items = []
        for record in records:
            key = record_key(record)
            payload = self._payload(record)
            if isinstance(payload, str):
                # Still replicated, by push-pull only.  (The daemon refuses
                # an app whose records would not fit; a peer's may not.)
                self.driver_stats.records_too_large += 1
                if key not in self._said_too_large:  # once a key, not at every write
                    if len(self._said_too_large) >= MAX_SAID_TOO_LARGE:
                        self._said_too_large.clear()
                    self._said_too_large.add(key)
                    log.warning("record too large to gossip key=%r reason=%s", key, payload)
                continue
            items.append((key, payload))
        token = None
        if direct:
            token = self.core.deliver(items, trio.current_time())
        else:
            for key, payload in items:
                self.core.broadcast(key, payload)
        self._wake.set()
        return token

    def unfit(self, record: Record) -> str | None:
        """Why *record* cannot ride on a gossip packet, or None if it can."""
        payload = self._payload(record)
        return payload if isinstance(payload, str) else None

    def _payload(self, record: Record) -> bytes | str:
        """*record* encoded for a gossip packet, or why it cannot ride on one."""
        try:
            payload = encode_record(record)
        except (ValueError, OverflowError) as exc:
            return str(exc)
        if not self.core.fits(record_key(record), payload):
            return f"{len(payload)} bytes do not fit in a packet"
        return payload

    def members(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for member in sorted(self.core.members(), key=lambda m: m.name):
            address, labels = decode_meta(member.meta)
            out.append(
                {
                    "name": member.name,
                    "address": address or member.address[0],
                    "gossip": host_port(member.address),
                    "status": member.state.name.lower(),
                    "labels": labels,
                    "incarnation": member.incarnation,
                }
            )
        return out

    def name_conflicts(self) -> list[str]:
        """Gossip addresses of members that use this node's own name."""
        return list(self._conflicts)

    def unresolved_seeds(self) -> dict[str, str]:
        """Seeds of the last join whose host did not resolve, and why."""
        return dict(self._unresolved)

    def self_seeds(self) -> list[str]:
        """Seeds of the last join that turned out to be this node."""
        return list(self._self_seeds)

    async def join(self, seeds: Sequence[str]) -> int:
        """Push-pull with each seed; how many answered."""
        self._left = False
        self._conflicts.clear()  # what this join finds, not what earlier ones did
        self._unresolved.clear()
        self._self_seeds.clear()
        self._answered_by_self.clear()
        rejoining = self.core.leaving
        if rejoining:
            self._core = self._new_core(self.address)
            self._member_hosts = None
            log.info("gossip rejoining after leave incarnation=%d", self._incarnation)
        addresses: list[swim.Address] = []
        seeds_at: dict[swim.Address, list[str]] = {}  # two names may reach one address
        unresolved = 0
        for seed in seeds:
            host, port = parse_address(seed, flag="seed")
            try:
                address = await self._transport.resolve(host, port)
            except OSError as exc:
                unresolved += 1
                self._unresolved[seed] = exc.strerror or str(exc)
                log.warning("cannot resolve seed=%s reason=%s", seed, exc)
                continue
            addresses.append(address)
            seeds_at.setdefault(address, []).append(seed)
            if address == self.core.local_member.address:
                self._self_seeds.append(seed)
        # Seeds that name ourselves are skipped by the core; unresolved ones are worth a retry.
        self._join_requested = self.core.join(addresses, trio.current_time()) + unresolved
        if not self._join_requested:
            return 0
        requests = self.core.take_stream_requests()
        results: list[bool] = []

        async def attempt(request: swim.StreamRequest) -> None:
            results.append(await self._exchange(request))

        async with trio.open_nursery() as nursery:
            for request in requests:
                if request.purpose is swim.StreamPurpose.JOIN and request.dest in addresses:
                    nursery.start_soon(attempt, request)
                else:
                    self._start_stream(request)
        joined = sum(results)
        self._self_seeds += [seed for a in self._answered_by_self for seed in seeds_at.get(a, ())]
        self._answered_by_self.clear()
        if rejoining and joined:
            # Published while we were away: peers heard none of it.
            records = self._daemon.node.republish()
            if records:
                self._changes.put(records, local=True)
        await self._drain()  # the join's events (a name conflict among them) are seen now
        await self._backlog.wait_merged()  # and the seeds' tables are ours
        self._wake.set()
        log.info("join seeds=%s reached=%d", ",".join(seeds), joined)
        return joined

    async def leave(self) -> None:
        """Leave gracefully: announce it and give the announcement time to spread."""
        core = self.core
        self._left = True  # the start-up join, if still retrying, gives up
        if core.leaving:
            return
        core.leave(trio.current_time())
        self._wake.set()
        if core.num_live() > 1:
            with trio.move_on_after(LEAVE_PROPAGATE_S):
                while core.pending_broadcasts:
                    await trio.sleep(self.config.gossip_interval)
        log.info("left the cluster name=%s", core.name)

    def stats(self) -> dict[str, Any]:
        core = self.core
        s = core.stats
        d = self.driver_stats
        t = self._transport.stats
        states = Counter(m.state for m in core.members())
        return {
            "name": core.name,
            "advertise": host_port(core.local_member.address),
            "profile": self._options.profile,
            "encrypted": self._keyring is not None,
            "incarnation": core.local_member.incarnation,
            "health_score": core.health_score,
            "members": {state.name.lower(): states.get(state, 0) for state in swim.MemberState},
            "packets": {"received": s.packets_received, "sent": s.packets_sent},
            "bytes": {"received": s.bytes_received, "sent": s.bytes_sent},
            "messages": {"received": s.messages_received, "sent": s.messages_sent},
            "drops": {
                "auth": s.packets_dropped_auth,
                "malformed": s.packets_dropped_malformed,
                "broadcasts_unknown": s.broadcasts_dropped_unknown,
                "broadcasts_queue_full": s.broadcasts_dropped_full,
                "broadcast_keys_forgotten": s.broadcast_keys_forgotten,
                "oversized": t.datagrams_oversized,
                "send_errors": t.datagrams_send_errors,
                "receive_errors": t.datagrams_receive_errors,
            },
            "streams": {
                "sent": s.streams_sent,
                "received": s.streams_received,
                "failed": s.streams_failed,
                "dropped_auth": s.streams_dropped_auth,
                "dropped_malformed": s.streams_dropped_malformed,
                "from_self": s.streams_from_self,
                "timed_out": t.streams_timed_out,
                "oversized": t.streams_oversized,
                "busy": t.streams_busy,
                "io_errors": t.streams_io_errors,
            },
            "probes": {"sent": s.probes_sent, "failed": s.probes_failed},
            # New client port blocks, sent straight to each member (deliver).
            "deliveries": {"sent": s.deliveries_sent, "unacked": s.deliveries_unacked},
            "refutations": s.refutations,
            # Leaves by our members' names that were not theirs (see swim._core._is_own_leave).
            "leaves_ignored": s.leaves_ignored,
            "records": {
                "malformed": d.records_malformed + self._backlog.malformed,
                "of_gone_members": d.records_of_gone,
                "non_members_withdrawn": d.non_members_withdrawn,
                "too_large": d.records_too_large,
                "states_dropped": self._backlog.dropped,
                "republished": d.republished,
            },
            "reconnects": s.reconnects,
            "members_reaped": s.members_reaped,
            "revival_syncs": d.revival_syncs,
        }

    # -- StateDelegate -------------------------------------------------------------------

    def local_state(self) -> bytes:
        # The core asks for it in the middle of a stream, and packing 200 000
        # records takes a second.  Records are immutable: each is packed once,
        # and reused for as long as the table holds that very object.
        old = self._packed
        self._packed = {}
        for record in self._daemon.node.table.records():
            entry = old.get(id(record))
            if entry is None or entry[0] is not record:
                entry = (record, encode_record(record))
            self._packed[id(record)] = entry
        return pack_packed_array([packed for _, packed in self._packed.values()])

    def merge_remote_state(self, data: bytes, *, join: bool) -> None:
        # Called by the core in the middle of a stream: a task merges it later
        # (see axnet._gossip_backlog).
        self._backlog.put(data)

    def _count_dropped(self, decoded: Decoded) -> None:
        if decoded.dropped:
            self.driver_stats.records_malformed += decoded.dropped
            log.warning(
                "dropped malformed records count=%d first=%s",
                decoded.dropped,
                decoded.first_error,
            )

    def _merge_records(self, received: list[Record]) -> None:
        # A gone member's records were withdrawn when it went; one still on
        # its way (a broadcast retransmitted, a peer's older push-pull) must
        # not bring it back.  Its revival republishes them.
        records = [r for r in received if r.deleted or not self._is_gone(r.node)]
        self.driver_stats.records_of_gone += len(received) - len(records)
        merged = self._daemon.merge_remote(records)
        self._heap.merged(len(merged.accepted), len(self._daemon.node.table))
        if merged.refused:
            self.driver_stats.records_malformed += len(merged.refused)
            first = merged.refused[0]
            log.warning(
                "dropped records dated over a day ahead of this clock count=%d "
                "first=%s node=%s version=%d",
                len(merged.refused),
                record_key(first).decode(),
                first.node,
                first.version,
            )
        if merged.accepted:
            self._changes.put(merged.accepted, local=False)
            for record in merged.accepted:  # packed now, a chunk at a time, not by local_state
                self._packed[id(record)] = (record, encode_record(record))
        if merged.reasserted:
            self.driver_stats.republished += len(merged.reasserted)
            log.info("records reasserted above a peer's version count=%d", len(merged.reasserted))
            self._changes.put(merged.reasserted, local=True)

    def _is_gone(self, node: str) -> bool:
        """Whether *node*'s live records are not to be taken: a member the core
        holds dead or left, or a node it does not know whose records we withdrew
        (forgotten after its death, or swept as no member) and that has not
        joined since.  The core's own view goes first: an event it has queued
        (a death, a return) may not be handled yet."""
        member = self.core.member(node)
        if member is not None:
            return member.state in (swim.MemberState.DEAD, swim.MemberState.LEFT)
        return node in self._gone

    def _hold_gone(self, node: str) -> None:
        self._gone.pop(node, None)
        self._gone[node] = None
        while len(self._gone) > MAX_GONE_NAMES:
            del self._gone[next(iter(self._gone))]

    def sweep_orphans(self, now: float) -> int:
        """Withdraw the records of nodes that have been no member for ORPHAN_GRACE_S.

        Records normally go with their member's death or leave.  Those of a
        node that is no member at all (forgotten after its death, then brought
        back by a peer that was partitioned all along, or never seen here)
        would stay forever.  Returns how many nodes' records were withdrawn.
        """
        core = self.core
        owners = {r.node for r in self._daemon.node.table.records() if not r.deleted}
        strays = {node for node in owners if node != core.name and core.member(node) is None}
        # Those that joined, or whose records went, leave the watch.
        self._orphans = {node: self._orphans.get(node, now) for node in strays}
        withdrawn = [n for n, since in self._orphans.items() if now - since >= ORPHAN_GRACE_S]
        for node in withdrawn:
            del self._orphans[node]
            log.warning("node is no member of the cluster: its records are withdrawn name=%s", node)
            self._hold_gone(node)
            self._forget(node)
        self.driver_stats.non_members_withdrawn += len(withdrawn)
        return len(withdrawn)

    async def _sweep_orphans_forever(self) -> None:
        while True:
            await trio.sleep(ORPHAN_SWEEP_S)
            self.sweep_orphans(trio.current_time())

    # -- driver loop ---------------------------------------------------------------------

    async def _drive(self) -> None:
        while True:
            now = trio.current_time()
            if now >= self.core.next_deadline():
                self.core.tick(now)
            await self._drain()
            deadline = max(self.core.next_deadline(), trio.current_time() + MIN_TICK_S)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _drain(self) -> None:
        core = self.core
        while True:
            datagrams = core.take_datagrams()
            requests = core.take_stream_requests()
            events = core.take_events()
            for request in requests:
                self._start_stream(request)
            for event in events:
                self._on_event(event)
            self._check_refuted()
            if datagrams:
                # Acks leave once the records they acknowledge are on their
                # way to the supervisors here (see deliver), or ACK_HOLD_S
                # has passed.
                await self._changes.wait_handed_over()
            for datagram in datagrams:
                await self._transport.send(datagram)
            if not (datagrams or requests or events):
                return

    def _check_refuted(self) -> None:
        incarnation = self.core.local_member.incarnation
        if incarnation <= self._incarnation:
            return
        # We never change our own metadata, so a higher incarnation means we
        # refuted a suspicion or a death: whoever declared us dead tombstoned
        # our records, so write them again above those tombstones.
        self._incarnation = incarnation
        records = self._daemon.node.republish()
        if records:
            self.driver_stats.republished += len(records)
            self._changes.put(records, local=True)

    # -- Receiver ------------------------------------------------------------------------

    def datagram_received(self, src: swim.Address, data: bytes) -> None:
        core = self.core
        before = core.stats.packets_dropped_auth
        core.handle_datagram(src, data, trio.current_time())
        if core.stats.packets_dropped_auth != before:
            self._warn_auth(src, "datagram", core.stats.packets_dropped_auth)
        self._wake.set()

    def stream_received(self, src: swim.Address, data: bytes) -> bytes:
        core = self.core
        before = core.stats.streams_dropped_auth
        reply = core.handle_stream(src, data, trio.current_time())
        if core.stats.streams_dropped_auth != before:
            self._warn_auth(src, "stream", core.stats.streams_dropped_auth)
        self._wake.set()
        return reply

    def is_member_host(self, host: str) -> bool:
        if self._member_hosts is None:
            self._member_hosts = {m.address[0] for m in self.core.members()}
        return host in self._member_hosts

    def _warn_auth(self, src: swim.Address, what: str, total: int) -> None:
        now = trio.current_time()
        last = self._auth_warned.get(src[0])
        if last is not None and now - last < AUTH_WARNING_INTERVAL_S:
            return
        if len(self._auth_warned) >= MAX_WARNED_SOURCES:
            self._auth_warned.clear()
        self._auth_warned[src[0]] = now
        log.warning(
            "gossip refused %s from=%s reason=authentication-failed (wrong or missing gossip "
            "key?) refused_total=%d",
            what,
            host_port(src),
            total,
        )

    # -- streams -------------------------------------------------------------------------

    def _start_stream(self, request: swim.StreamRequest) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._exchange, request)

    async def _exchange(self, request: swim.StreamRequest) -> bool:
        """Carry out a stream the core asked for; True if the peer answered well."""
        core = self.core
        reply = await self._transport.exchange(request)
        if core is not self._core:  # we left and rejoined meanwhile
            return False
        ok = False
        if reply is None:
            core.stream_failed(request.dest, trio.current_time())
        else:
            before = self._stream_drops(core)
            core.handle_stream_reply(request.dest, reply, trio.current_time())
            ok = self._stream_drops(core) == before
            if core.stats.streams_dropped_auth != before[0]:
                self._warn_auth(request.dest, "stream reply", core.stats.streams_dropped_auth)
            if core.stats.streams_from_self != before[2]:
                log.warning("gossip address=%s is this node itself", host_port(request.dest))
                self._answered_by_self.add(request.dest)
        self._wake.set()
        return ok

    @staticmethod
    def _stream_drops(core: swim.Swim) -> tuple[int, int, int]:
        """Counts of stream replies that taught us nothing (a reply from
        ourselves among them)."""
        s = core.stats
        return (s.streams_dropped_auth, s.streams_dropped_malformed, s.streams_from_self)

    # -- membership events ---------------------------------------------------------------

    def _on_event(self, event: swim.Event) -> None:
        if not isinstance(event, swim.UserMessage | swim.Delivered):
            self._member_hosts = None  # membership changed
        match event:
            case swim.MemberJoined(member=member):
                log.info("member joined name=%s gossip=%s", member.name, host_port(member.address))
                self._gone.pop(member.name, None)
                if member.name in self._failed:
                    self._failed.discard(member.name)
                    self._revival_sync(member)
            case swim.MemberUpdated(member=member):
                log.info("member updated name=%s", member.name)
            case swim.MemberSuspected(member=member, accuser=accuser):
                log.info("member suspect name=%s accuser=%s", member.name, accuser)
            case swim.MemberAlive(member=member):
                log.info("member refuted suspicion name=%s", member.name)
            case swim.MemberDead(member=member, accuser=accuser):
                log.warning("member dead name=%s accuser=%s", member.name, accuser)
                self._failed.add(member.name)
                self._hold_gone(member.name)
                self._forget(member.name)
            case swim.MemberLeft(member=member):
                log.info("member left name=%s", member.name)
                self._failed.discard(member.name)
                self._hold_gone(member.name)
                self._forget(member.name)
            case swim.MemberReaped(member=member):
                log.info("member forgotten name=%s", member.name)
                self._failed.discard(member.name)
            case swim.NameConflict(name=name, address=address):
                if (where := host_port(address)) not in self._conflicts:
                    self._conflicts.append(where)
                log.error(
                    "another member is named %s, at %s: members need distinct names. If it "
                    "is this node's previous life (restarted at a new address), wait: this "
                    "node takes the name once members find it dead. Else restart one daemon "
                    "with its own --name",
                    name,
                    host_port(address),
                )
            case swim.Delivered(token=token, missing=missing):
                waiting = self._deliveries.get(token)
                if waiting is not None:  # else its waiter gave up
                    done, out = waiting
                    out.extend(missing)
                    done.set()
                if missing:
                    log.info("records not acknowledged in time by=%s", ",".join(missing))
            case swim.UserMessage(sender=sender, payload=payload):
                try:
                    item = unpack(payload)
                except WireError:
                    self.driver_stats.records_malformed += 1
                    log.debug("dropped malformed record broadcast sender=%s", sender)
                    return
                decoded = records_from_wire([item])
                self._count_dropped(decoded)
                self._merge_records(decoded.records)
            case _:
                assert_never(event)

    def _successor_host(self, name: str) -> IPAddress | None:
        """The real host of a member that took *name* back as it went (its
        host restarted at a new address: see swim's successors), if any."""
        member = self.core.member(name)
        if member is None or member.state not in (swim.MemberState.ALIVE, swim.MemberState.SUSPECT):
            return None
        address, _ = decode_meta(member.meta)
        return ipaddress.ip_address(address) if address is not None else None

    def _forget(self, name: str) -> None:
        # What the successor serves is its own; what its predecessor served
        # elsewhere goes (the successor withdrew it too, if its join saw it).
        spare = self._successor_host(name)
        forgotten = self._daemon.node.forget_node(name, now=time.time(), spare_host=spare)
        if tombstones := forgotten.accepted:
            log.info("records of a gone member withdrawn name=%s count=%d", name, len(tombstones))
            self._changes.put(tombstones, local=False)
        if ours := forgotten.reasserted:
            log.info("services a gone member had won served from here again count=%d", len(ours))
            self._changes.put(ours, local=True)

    def _revival_sync(self, member: swim.Member) -> None:
        """Show a member back from the dead the tombstones we wrote for it."""
        others = max(1, self.core.num_live() - 1)
        if self._rng.random() < min(1.0, REVIVAL_SYNC_FANOUT / others):
            self.driver_stats.revival_syncs += 1
            self.core.join([member.address], trio.current_time())
            self._wake.set()

    def joining(self) -> bool:
        """Whether the start-up join is still under way (no seed answered yet)."""
        return not self._start_join_done.is_set()

    async def wait_joined(self) -> None:
        """Until the start-up join is over: the seeds' tables are merged."""
        await self._start_join_done.wait()

    async def _join_at_start(self, seeds: Sequence[str]) -> None:
        try:
            await self._join_with_retries(seeds)
        finally:
            self._start_join_done.set()

    async def _join_with_retries(self, seeds: Sequence[str]) -> None:
        delay = JOIN_BACKOFF_MIN_S
        while not self._left:
            try:
                joined = await self.join(seeds)
            except ValueError as exc:  # validated at start; a resolver may still object
                log.warning("join failed reason=%s", exc)
                joined = 0
            if joined or not self._join_requested or set(self._self_seeds) >= set(seeds):
                return  # done, or every seed is ourselves
            log.warning(
                "join failed: no seed answered seeds=%s retry_in=%.0fs", ",".join(seeds), delay
            )
            await trio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, JOIN_BACKOFF_MAX_S)


__all__ = [
    "GossipCluster",
]
