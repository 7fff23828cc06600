"""The Swim state machine: SWIM failure detection with Lifeguard, and
infection-style dissemination, without I/O.

Theory of operation. Bytes and `now` go in (`handle_datagram`,
`handle_stream`, `handle_stream_reply`, `stream_failed`, `tick`); datagrams,
stream requests and events come out (`take_*`). The driver calls `tick` no
later than `next_deadline()`. Nothing here reads a clock or draws randomness
other than from the `rng` given at construction.

* Probing. Once per probe interval (* local health multiplier) the next
  member of a shuffled round-robin order is pinged. The order is a fresh
  random permutation per round, i → (a*i + b) mod n with gcd(a, n) = 1, which
  visits every member exactly once per round in O(1) memory. No ack within the
  probe timeout → `indirect_checks` members are asked to ping it for us
  (ping-req, answering with a nack if they get nothing) and a TCP ping is
  requested from the driver. No ack by the end of the interval → the member
  becomes suspect. A suspect's ping carries the suspicion (buddy system), so
  it learns of it at once and can refute.
* Lifeguard. Missed nacks and refutations raise our health score, successful
  probes lower it (see _awareness). Suspicion timeouts start at the maximum and
  shrink with independent confirmations (see _suspicion).
* Incarnations. Only a member raises its own incarnation: to refute a
  suspicion or death, to change its metadata. alive(i) beats suspect(j) and
  dead(j) for i > j; suspect(i) beats alive(i); dead(i) beats both. The first
  incarnation comes from the driver (seeded from a clock), so a restarted
  member outranks its own tombstone.
* Dissemination. Every state change is queued in the broadcast queue (see
  _broadcast) and piggybacked on pings, acks and gossip packets, which are
  packed up to MAX_PACKET_BYTES. News is never sent back to the member we
  got it from, nor an application broadcast to its origin (unlike
  memberlist): in a small cluster those wasted transmits left a member
  unreached until the next push-pull after one broadcast in 250 (lan
  profile, five members; one in four with the local profile's two sends).
* Anti-entropy. Periodically, and on join, the full member list and the
  delegate's state are exchanged over a stream the driver carries out.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol, assert_never

import attrs

from ._awareness import Awareness
from ._broadcast import BroadcastQueue
from ._config import MAX_META_BYTES, MAX_PACKET_BYTES, MAX_PUSH_PULL_BYTES, Config
from ._errors import ProtocolError
from ._events import (
    Datagram,
    Delivered,
    Event,
    Member,
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberSuspected,
    MemberUpdated,
    NameConflict,
    StreamPurpose,
    StreamRequest,
    UserMessage,
)
from ._keyring import SEAL_OVERHEAD, SEALED_VERSION, AuthenticationError, Keyring
from ._math import push_pull_scale, retransmit_limit, suspicion_timeout
from ._messages import (
    MAX_INCARNATION,
    PLAIN_VERSION,
    Ack,
    Address,
    Alive,
    Dead,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    PushPullEntry,
    Suspect,
    UserBroadcast,
    compound,
    decode_envelope,
    encode_message,
)
from ._rng import Rng
from ._state import MemberTable, SharedView
from ._stats import Stats
from ._suspicion import Suspicion

_MAX_NAME = 255

#: A node refused a live member's name takes it when the member goes only
#: if heard within this many push-pull intervals (see Swim._successors).
SUCCESSOR_HEARD_PUSH_PULLS = 2

#: Distinct (origin, key) broadcasts remembered; past it the oldest is
#: forgotten (and counted).  ~200 bytes each.
MAX_USER_KEYS = 200_000

#: Worst-case envelope bytes around the messages: version + array header.
_ENVELOPE = 1 + 3
#: A seq no wider than any other once encoded.
_WIDEST_SEQ = 2**64 - 1
#: Eligible-member scans are exact below this table size, sampled above.
_EXACT_PICK = 128


class StateDelegate(Protocol):
    """Application state carried by push-pull (axnet's service table)."""

    def local_state(self) -> bytes:
        """Our whole state, sent to the peer of a push-pull."""
        ...

    def merge_remote_state(self, data: bytes, *, join: bool) -> None:
        """Merge a peer's state; `join` is True when the exchange is a join."""
        ...


@attrs.define(kw_only=True, slots=True)
class _Probe:
    target: str
    seq: int
    started: float
    timeout_at: float
    end_at: float
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0


#: Fraction of the probe timeout a helper waits for the target before it nacks.
NACK_FRACTION = 0.8


@attrs.define(kw_only=True, slots=True)
class _Relay:
    requester: Address
    seq: int
    nack: bool
    deadline: float


@attrs.define(kw_only=True, slots=True)
class _Delivery:
    #: Ping seq of each datagram not acknowledged yet → the member it went to.
    waiting: dict[int, str]
    expires_at: float


def _user_key(origin: str, key: bytes) -> tuple[str, str, bytes]:
    return ("user", origin, key)


class Swim:
    """One SWIM member. See the module docstring for the theory of operation."""

    def __init__(
        self,
        *,
        name: str,
        address: Address,
        config: Config,
        rng: Rng,
        now: float,
        incarnation: int = 0,
        meta: bytes = b"",
        delegate: StateDelegate | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        if not name or len(name.encode()) > _MAX_NAME:
            raise ValueError(f"name must be 1 to {_MAX_NAME} bytes of UTF-8, got {name!r}")
        if len(meta) > MAX_META_BYTES:
            raise ValueError(f"meta must be at most {MAX_META_BYTES} bytes, got {len(meta)}")
        if incarnation < 0:
            raise ValueError(f"incarnation must be >= 0, got {incarnation}")
        self._name = name
        self._config = config
        self._rng = rng
        self._delegate = delegate
        self._keyring = keyring
        self._self = Member(
            name=name, address=address, incarnation=incarnation, state=MemberState.ALIVE, meta=meta
        )
        self._table = MemberTable()
        self._table.put(self._self)
        self._queue = BroadcastQueue()
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._suspicions: dict[str, Suspicion] = {}
        self._dead_at: dict[str, float] = {}
        self._relays: dict[int, _Relay] = {}
        self._probe: _Probe | None = None
        self._seq = 0
        self._round = (0, 1, 0, 0)  # n, a, b, i of the current probe permutation
        self._leaving = False
        #: Addresses seen announcing our own name (reported once each, and
        #: again after a join: see join).
        self._conflicts: set[Address] = set()
        self._boot = incarnation
        #: Name → the newest Alive refused because a live member holds that
        #: name elsewhere, and when it was heard: it takes the name once that
        #: member dies or leaves (a host restarted at a new address before its
        #: old self was found dead), instead of at some later push-pull.  Not
        #: one heard longer ago than SUCCESSOR_HEARD_PUSH_PULLS push-pulls,
        #: nor one the member outlived by proving itself alive since: a twin
        #: stopped long ago would come back as a ghost at the member's end.
        self._successors: dict[str, tuple[Alive, float]] = {}
        self._user_seq = 0
        #: Deliveries under way by token, and the token of each ping seq.
        self._deliveries: dict[int, _Delivery] = {}
        self._delivering: dict[int, int] = {}
        self._delivery_token = 0
        #: Members that left a delivery unacked → the seq of the newest
        #: datagram sent them since, and the reverse: they are sent to but
        #: not waited for until they ack one (a member that does not answer
        #: must not hold up every delivery by the probe timeout).
        self._laggards: dict[str, int] = {}
        self._late: dict[int, str] = {}
        #: (origin, key) -> newest (boot, seq) seen from another member;
        #: oldest first, for the cap.
        self._user_seen: collections.OrderedDict[tuple[str, bytes], tuple[int, int]] = (
            collections.OrderedDict()
        )
        self._datagrams: list[Datagram] = []
        self._streams: list[StreamRequest] = []
        self._events: list[Event] = []
        self.stats = Stats()
        # Stagger timers so that members started together do not beat in step.
        self._next_probe_at = now + rng.random() * config.probe_interval
        self._next_gossip_at = now + rng.random() * config.gossip_interval
        self._next_push_pull_at = (
            now + config.push_pull_interval * (1 + rng.random())
            if config.push_pull_interval > 0
            else math.inf
        )
        self._next_reconnect_at = (
            now + config.reconnect_interval * (1 + rng.random())
            if config.reconnect_interval > 0
            else math.inf
        )
        self._next_reap_at = now + config.reap_interval
        self._queue_self_alive()

    # -- read-only views ------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> Config:
        return self._config

    @property
    def local_member(self) -> Member:
        return self._self

    @property
    def keyring(self) -> Keyring | None:
        return self._keyring

    @property
    def health_score(self) -> int:
        """Lifeguard local health score; 0 is healthy."""
        return self._awareness.score

    @property
    def leaving(self) -> bool:
        return self._leaving

    @property
    def pending_broadcasts(self) -> int:
        """Messages still waiting in the broadcast queue."""
        return len(self._queue)

    def members(self) -> list[Member]:
        """Every member known, tombstones and the local member included."""
        return list(self._table)

    def member(self, name: str) -> Member | None:
        return self._table.get(name)

    def num_live(self) -> int:
        """Members alive or suspect, the local member included (N in formulas)."""
        return self._table.live

    # -- outputs ----------------------------------------------------------------

    def take_datagrams(self) -> list[Datagram]:
        out, self._datagrams = self._datagrams, []
        return out

    def take_stream_requests(self) -> list[StreamRequest]:
        out, self._streams = self._streams, []
        return out

    def take_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    # -- application API --------------------------------------------------------

    def join(self, seeds: Sequence[Address], now: float) -> int:
        """Request a join push-pull with each seed; returns how many were requested.

        A member announcing our name is reported again (`NameConflict`) when
        this join meets it: the clash is why the join cannot take effect."""
        self._conflicts.clear()
        count = 0
        for seed in seeds:
            if tuple(seed) == self._self.address:
                continue
            self._request_stream(seed, self._push_pull(join=True), StreamPurpose.JOIN)
            count += 1
        return count

    def broadcast(self, key: bytes, payload: bytes) -> None:
        """Disseminate `payload`; it supersedes our earlier broadcast under `key`."""
        self._user_broadcast(key, payload)

    def fits(self, key: bytes, payload: bytes) -> bool:
        """Whether a broadcast of `payload` under `key` fits in a packet:
        `broadcast` and `deliver` raise ValueError for one that does not."""
        widest = UserBroadcast(
            origin=self._name, key=key, boot=self._boot, seq=_WIDEST_SEQ, payload=payload
        )
        return len(encode_message(widest)) <= self._packet_room()

    def deliver(self, items: Sequence[tuple[bytes, bytes]], now: float) -> int:
        """Broadcast each (key, payload) of `items`, and send them at once to
        every member alive as well, each datagram with a ping (and our alive,
        so that a member that has not heard of us yet takes them).

        Returns a token; a `Delivered` event with it follows once every one
        of those members acknowledged, or after the probe timeout, naming
        those that did not.  A member that left an earlier delivery unacked
        is sent to but not waited for, until it acks one again.

        A member's core handles a datagram's broadcasts before its driver
        sends the ack, if the driver hands events over before it sends
        datagrams: then an ack means "handed to the application".  Costs a
        datagram a member: for news that must not wait for gossip's rounds
        (a new client's identity), not for every change.
        """
        messages = [self._user_broadcast(key, payload) for key, payload in items]
        me = self._self
        alive = encode_message(
            Alive(incarnation=me.incarnation, member=me.name, address=me.address, meta=me.meta)
        )
        self._delivery_token += 1
        token = self._delivery_token
        waiting: dict[int, str] = {}
        for name in list(self._laggards):  # gone, or no longer alive: forgotten
            lagging = self._table.get(name)
            if lagging is None or lagging.state is not MemberState.ALIVE:
                self._late.pop(self._laggards.pop(name), None)
        for member in self._table:
            if member.name == self._name or member.state is not MemberState.ALIVE:
                continue
            # Sized at the widest seq: the packets' pings take the next ones.
            widest = Ping(seq=_WIDEST_SEQ, target=member.name, source=me.name)
            room = self._packet_room() - len(encode_message(widest))
            for packet in _packets(messages, room, alive):
                self._seq += 1
                ping = encode_message(Ping(seq=self._seq, target=member.name, source=me.name))
                self.stats.deliveries_sent += 1
                self._emit(member.address, [ping, *packet])
                if member.name in self._laggards:
                    self._lagging(member.name, self._seq)
                else:
                    waiting[self._seq] = member.name
                    self._delivering[self._seq] = token
        self._deliveries[token] = _Delivery(
            waiting=waiting, expires_at=now + self._config.probe_timeout
        )
        if not waiting:
            self._finish_delivery(token)
        return token

    def _user_broadcast(self, key: bytes, payload: bytes) -> bytes:
        """Queue a broadcast of ours; returns it encoded."""
        self._user_seq += 1
        message = UserBroadcast(
            origin=self._name, key=key, boot=self._boot, seq=self._user_seq, payload=payload
        )
        encoded = encode_message(message)
        if len(encoded) > self._packet_room():
            raise ValueError(
                f"broadcast of {len(encoded)} encoded bytes does not fit in a packet "
                f"({self._packet_room()} bytes)"
            )
        self._disseminate(_user_key(self._name, key), encoded)
        return encoded

    def _lagging(self, name: str, seq: int) -> None:
        """*name* has not acked a delivery: its ack of *seq* (the newest
        datagram sent it) makes it waited for again."""
        old = self._laggards.get(name)
        if old is not None:
            if old > seq:
                return
            self._late.pop(old, None)
        self._laggards[name] = seq
        self._late[seq] = name

    def _finish_delivery(self, token: int) -> None:
        delivery = self._deliveries.pop(token)
        for seq, name in delivery.waiting.items():
            self._delivering.pop(seq, None)
            self._lagging(name, seq)
        self.stats.deliveries_unacked += len(delivery.waiting)
        missing = tuple(sorted(set(delivery.waiting.values())))
        self._events.append(Delivered(token=token, missing=missing))

    def _expire_deliveries(self, now: float) -> None:
        for token, delivery in list(self._deliveries.items()):
            if now >= delivery.expires_at:
                self._finish_delivery(token)

    def update_meta(self, meta: bytes, now: float) -> None:
        """Announce new metadata at incarnation + 1."""
        if len(meta) > MAX_META_BYTES:
            raise ValueError(f"meta must be at most {MAX_META_BYTES} bytes, got {len(meta)}")
        if self._leaving:
            return  # an Alive now would bring a left member back
        incarnation = min(self._self.incarnation + 1, MAX_INCARNATION)
        self._set_self(attrs.evolve(self._self, incarnation=incarnation, meta=meta))
        self._queue_self_alive()

    def leave(self, now: float) -> None:
        """Leave gracefully: a dead-by-self message, disseminated by further ticks."""
        if self._leaving:
            return
        self._leaving = True
        self._probe = None
        self._on_dead(
            Dead(incarnation=self._self.incarnation, member=self._name, accuser=self._name), now
        )

    # -- network input ----------------------------------------------------------

    def handle_datagram(self, src: Address, data: bytes, now: float) -> None:
        """Process one received datagram; bad ones are dropped and counted."""
        self.stats.packets_received += 1
        self.stats.bytes_received += len(data)
        try:
            messages = decode_envelope(self._open(data))
        except AuthenticationError:
            self.stats.packets_dropped_auth += 1
            return
        except ProtocolError:
            self.stats.packets_dropped_malformed += 1
            return
        # One ping and one ping-req per datagram, as any member sends: a
        # datagram packed with them must not turn into as many replies, each
        # draining the broadcast queue toward its sender.
        pinged = relayed = False
        # Broadcasts last: a member's Alive packed after its broadcast must
        # make it known first (broadcasts from unknown members are dropped).
        messages.sort(key=lambda m: isinstance(m, UserBroadcast))
        for message in messages:
            self.stats.messages_received += 1
            if isinstance(message, Ping):
                if pinged:
                    self.stats.messages_dropped += 1
                    continue
                pinged = True
            elif isinstance(message, PingReq):
                if relayed:
                    self.stats.messages_dropped += 1
                    continue
                relayed = True
            self._dispatch(src, message, now)

    def handle_stream(self, src: Address, data: bytes, now: float) -> bytes:
        """Answer a stream a peer opened (push-pull or TCP ping).

        Returns the reply bytes; b"" means 'drop the connection' (bad input,
        counted in stats).
        """
        self.stats.streams_received += 1
        message = self._open_stream(data)
        match message:
            case None:
                return b""
            case PushPull():
                self._merge(message, now)
                return self._seal(compound([encode_message(self._push_pull(join=message.join))]))
            case Ping():
                if message.target not in ("", self._name):
                    self.stats.streams_dropped_malformed += 1
                    return b""
                return self._seal(compound([encode_message(Ack(seq=message.seq))]))
            case _:
                self.stats.streams_dropped_malformed += 1
                return b""

    def handle_stream_reply(self, peer: Address, data: bytes, now: float) -> None:
        """Process the reply to a stream we requested."""
        message = self._open_stream(data)
        match message:
            case PushPull() if self._names_only_us(message):
                self.stats.streams_from_self += 1
            case PushPull():
                self._merge(message, now)
            case Ack():
                self._on_ack(message.seq, now)
            case None:
                pass
            case _:
                self.stats.streams_dropped_malformed += 1

    def stream_failed(self, peer: Address, now: float) -> None:
        """The driver could not complete a stream we requested."""
        self.stats.streams_failed += 1

    # -- timers -----------------------------------------------------------------

    def next_deadline(self) -> float:
        """Latest time at which `tick` must be called."""
        deadline = min(
            self._next_gossip_at,
            self._next_push_pull_at,
            self._next_reconnect_at,
            self._next_reap_at,
        )
        if not self._leaving:
            deadline = min(deadline, self._next_probe_at)
        probe = self._probe
        if probe is not None:
            deadline = min(deadline, probe.end_at)
            if not probe.indirect:
                deadline = min(deadline, probe.timeout_at)
        for relay in self._relays.values():
            deadline = min(deadline, relay.deadline)
        for suspicion in self._suspicions.values():
            deadline = min(deadline, suspicion.deadline())
        for delivery in self._deliveries.values():
            deadline = min(deadline, delivery.expires_at)
        return deadline

    def tick(self, now: float) -> None:
        """Run every timer due at `now`."""
        if self._relays:
            self._expire_relays(now)
        if self._suspicions:
            self._expire_suspicions(now)
        if self._deliveries:
            self._expire_deliveries(now)
        probe = self._probe
        if probe is not None:
            if not probe.indirect and now >= probe.timeout_at:
                self._probe_indirectly(probe, now)
            if now >= probe.end_at:
                self._probe_failed(probe, now)
        if self._suspicions:
            # A failed probe confirms a suspicion, which shortens it: maybe
            # into the past (as memberlist, the member is dead at once).
            self._expire_suspicions(now)
        if not self._leaving and self._probe is None and now >= self._next_probe_at:
            interval = self._awareness.scale(self._config.probe_interval)
            self._next_probe_at = now + interval
            self._probe_next(now, interval)
        if now >= self._next_gossip_at:
            self._next_gossip_at = now + self._config.gossip_interval
            self._gossip(now)
        if now >= self._next_push_pull_at:
            self._next_push_pull_at = now + push_pull_scale(
                self._config.push_pull_interval, self._table.live
            )
            self._push_pull_random()
        if now >= self._next_reconnect_at:
            self._next_reconnect_at = now + self._config.reconnect_interval
            self._reconnect(now)
        if now >= self._next_reap_at:
            self._next_reap_at = now + self._config.reap_interval
            self._reap(now)

    # -- simulation support -------------------------------------------------------

    def _preload(self, view: SharedView) -> None:
        """Adopt a shared member base (swim.testing builds big clusters this way)."""
        self._table = MemberTable(view)
        self._table.put(self._self)

    # -- dispatch -----------------------------------------------------------------

    def _dispatch(self, src: Address, message: Message, now: float) -> None:
        match message:
            case Ping():
                if message.target in ("", self._name):
                    self._send(src, [encode_message(Ack(seq=message.seq))])
            case PingReq():
                self._relay(src, message, now)
            case Ack():
                self._on_ack(message.seq, now)
            case Nack():
                probe = self._probe
                if probe is not None and probe.seq == message.seq:
                    probe.nacks = min(probe.nacks + 1, probe.expected_nacks)  # replays count once
            case Suspect():
                self._on_suspect(message, now, src)
            case Alive():
                self._on_alive(message, now, src)
            case Dead():
                self._on_dead(message, now, src)
            case UserBroadcast():
                self._on_user(message, src)
            case PushPull():
                self.stats.packets_dropped_malformed += 1  # push-pull only rides streams
            case _:
                assert_never(message)

    # -- probing ------------------------------------------------------------------

    def _next_target(self) -> Member | None:
        n, a, b, i = self._round
        for _ in range(len(self._table) + 1):
            if i >= n:
                n = len(self._table)
                a = self._coprime(n)
                b = int(self._rng.random() * n)
                i = 0
            index = (a * i + b) % n
            i += 1
            if index >= len(self._table):
                continue  # reaped since the round began
            member = self._table.get(self._table.name_at(index))
            if member is None or member.name == self._name:
                continue
            if member.state in (MemberState.ALIVE, MemberState.SUSPECT):
                self._round = (n, a, b, i)
                return member
        self._round = (n, a, b, i)
        return None

    def _coprime(self, n: int) -> int:
        if n <= 2:
            return 1
        while True:
            a = 1 + int(self._rng.random() * (n - 1))
            if math.gcd(a, n) == 1:
                return a

    def _probe_next(self, now: float, interval: float) -> None:
        target = self._next_target()
        if target is None:
            return
        self._seq += 1
        timeout = self._awareness.scale(self._config.probe_timeout)
        self._probe = _Probe(
            target=target.name,
            seq=self._seq,
            started=now,
            timeout_at=now + timeout,
            end_at=now + interval,
        )
        messages = [encode_message(Ping(seq=self._seq, target=target.name, source=self._name))]
        if target.state is MemberState.SUSPECT:
            # Buddy system: tell the suspect directly so it can refute at once.
            messages.append(
                encode_message(
                    Suspect(incarnation=target.incarnation, member=target.name, accuser=self._name)
                )
            )
        self.stats.probes_sent += 1
        self._send(target.address, messages)

    def _probe_indirectly(self, probe: _Probe, now: float) -> None:
        probe.indirect = True
        target = self._table.get(probe.target)
        if target is None:
            return
        helpers = self._pick(
            self._config.indirect_checks,
            lambda m: m.state is MemberState.ALIVE and m.name != probe.target,
        )
        request = encode_message(
            PingReq(
                seq=probe.seq,
                target=target.name,
                target_address=target.address,
                source=self._name,
                nack=True,
            )
        )
        for helper in helpers:
            self._send(helper.address, [request])
        probe.expected_nacks = len(helpers)
        if not self._config.disable_tcp_pings:
            ping = Ping(seq=probe.seq, target=target.name, source=self._name)
            self._request_stream(target.address, ping, StreamPurpose.PING)

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        self._probe = None
        self.stats.probes_failed += 1
        # Lifeguard: with helpers, only nacks we missed count against our own
        # health (their silence hints we are the slow one); without, any failure.
        if probe.expected_nacks > 0:
            self._awareness.apply_delta(probe.expected_nacks - probe.nacks)
        else:
            self._awareness.apply_delta(1)
        target = self._table.get(probe.target)
        if target is None:
            return
        self._on_suspect(
            Suspect(incarnation=target.incarnation, member=target.name, accuser=self._name), now
        )

    def _on_ack(self, seq: int, now: float) -> None:
        late = self._late.pop(seq, None)
        if late is not None:
            del self._laggards[late]  # answering again
            return
        token = self._delivering.pop(seq, None)
        if token is not None:
            delivery = self._deliveries[token]
            del delivery.waiting[seq]
            if not delivery.waiting:
                self._finish_delivery(token)
            return
        probe = self._probe
        if probe is not None and probe.seq == seq:
            if not probe.indirect:
                self._awareness.apply_delta(-1)
            self._probe = None
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(relay.requester, [encode_message(Ack(seq=relay.seq))])

    def _relay(self, src: Address, request: PingReq, now: float) -> None:
        self._seq += 1
        self._relays[self._seq] = _Relay(
            requester=src,
            seq=request.seq,
            nack=request.nack,
            # The requester sent this ping-req one probe timeout into a probe
            # that lasts two (LAN), so a nack after a full timeout lands just
            # after the probe ended and counts as missed: our silence would
            # then lower the requester's health exactly when it is right.
            # Answer a little early instead (memberlist waits the full timeout).
            deadline=now + NACK_FRACTION * self._config.probe_timeout,
        )
        ping = Ping(seq=self._seq, target=request.target, source=self._name)
        self._send(request.target_address, [encode_message(ping)])

    def _expire_relays(self, now: float) -> None:
        for seq, relay in list(self._relays.items()):
            if now >= relay.deadline:
                del self._relays[seq]
                if relay.nack:
                    self._send(relay.requester, [encode_message(Nack(seq=relay.seq))])

    # -- state transitions ------------------------------------------------------

    def _set_self(self, member: Member) -> None:
        self._self = member
        self._table.put(member)

    def _queue_self_alive(self) -> None:
        me = self._self
        alive = Alive(incarnation=me.incarnation, member=me.name, address=me.address, meta=me.meta)
        self._disseminate(me.name, encode_message(alive))

    def _disseminate(self, key: Hashable, data: bytes, *holders: Address | None) -> None:
        """Queue *data* for piggybacking, if it can ever ride on a packet: a
        peer's message too big to fit would never be sent nor retired, and
        would crowd out every other.  *holders* have it already (whoever
        told us, an application broadcast's origin): it is never sent them."""
        if len(data) > self._packet_room():
            self.stats.broadcasts_dropped_oversized += 1
            return
        if self._queue.queue(key, data, tuple(h for h in holders if h is not None)):
            self.stats.broadcasts_dropped_full += 1

    def _refute(self, accused: int) -> None:
        # Never above what every peer decodes: a refutation nobody can read
        # would cut this member off for good.  (At the top, an accusation
        # there cannot be refuted: a peer that sent it can evict us anyway.)
        incarnation = min(max(self._self.incarnation + 1, accused + 1), MAX_INCARNATION)
        self._set_self(attrs.evolve(self._self, incarnation=incarnation))
        self._queue_self_alive()
        self._awareness.apply_delta(1)
        self.stats.refutations += 1

    def _on_alive(self, alive: Alive, now: float, source: Address | None = None) -> None:
        if alive.member == self._name:
            me = self._self
            if alive.address != me.address:
                # Another node with our name (as memberlist): say so once per
                # address, and do not fight it over incarnations.
                self.stats.name_conflicts += 1
                if alive.address not in self._conflicts:
                    self._conflicts.add(alive.address)
                    self._events.append(NameConflict(name=self._name, address=alive.address))
                return
            if self._leaving or alive.incarnation < me.incarnation:
                return
            if (
                alive.incarnation == me.incarnation
                and alive.meta == me.meta
                and alive.address == me.address
            ):
                return
            self._refute(alive.incarnation)
            return
        old = self._table.get(alive.member)
        if old is not None and alive.incarnation <= old.incarnation:
            return
        if (
            old is not None
            and alive.address != old.address
            and old.state in (MemberState.ALIVE, MemberState.SUSPECT)
        ):
            # Another node with a live member's name (as memberlist): the
            # member keeps its address, whatever the newcomer's incarnation
            # (a clock, so the newest start would win).  The newcomer hears
            # of the member under its own name and reports the conflict; a
            # member that died or left may come back from anywhere: this
            # one, as soon as the member is found dead or leaves.
            self.stats.name_conflicts += 1
            waiting = self._successors.get(alive.member)
            if waiting is None or alive.incarnation >= waiting[0].incarnation:
                self._successors[alive.member] = (alive, now)
            return
        self._successors.pop(alive.member, None)  # the member proved itself alive since
        self._suspicions.pop(alive.member, None)
        self._dead_at.pop(alive.member, None)
        new = Member(
            name=alive.member,
            address=alive.address,
            incarnation=alive.incarnation,
            state=MemberState.ALIVE,
            meta=alive.meta,
        )
        self._table.put(new)
        # The member itself holds its own news: were it counted among the
        # sends, the few a small cluster allows could all go to the member
        # that just joined, and the others would not hear of it until a
        # push-pull (in 1 of 100 three-member joins, simulated).
        self._disseminate(alive.member, encode_message(alive), source, alive.address)
        if old is None or old.state in (MemberState.DEAD, MemberState.LEFT):
            self._events.append(MemberJoined(member=new))
            return
        if old.state is MemberState.SUSPECT:
            self._events.append(MemberAlive(member=new))
        if old.meta != new.meta or old.address != new.address:
            self._events.append(MemberUpdated(member=new))

    def _on_suspect(self, suspect: Suspect, now: float, source: Address | None = None) -> None:
        member = self._table.get(suspect.member)
        if member is None or suspect.incarnation < member.incarnation:
            return
        if suspect.member == self._name:
            if not self._leaving:
                self._refute(suspect.incarnation)
            return
        suspicion = self._suspicions.get(suspect.member)
        if suspicion is not None:
            if suspicion.confirm(suspect.accuser):
                self._disseminate(suspect.member, encode_message(suspect), source)
            return
        if member.state is not MemberState.ALIVE:
            return
        new = attrs.evolve(member, incarnation=suspect.incarnation, state=MemberState.SUSPECT)
        self._table.put(new)
        self._disseminate(suspect.member, encode_message(suspect), source)
        n = self._table.live
        k = self._config.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        minimum = suspicion_timeout(self._config.suspicion_mult, n, self._config.probe_interval)
        self._suspicions[suspect.member] = Suspicion(
            accuser=suspect.accuser,
            incarnation=suspect.incarnation,
            k=k,
            minimum=minimum,
            maximum=self._config.suspicion_max_timeout_mult * minimum,
            start=now,
        )
        self._events.append(MemberSuspected(member=new, accuser=suspect.accuser))

    def _expire_suspicions(self, now: float) -> None:
        for name, suspicion in list(self._suspicions.items()):
            if now < suspicion.deadline():
                continue
            del self._suspicions[name]
            member = self._table.get(name)
            if (
                member is not None
                and member.state is MemberState.SUSPECT
                and member.incarnation == suspicion.incarnation
            ):
                dead = Dead(incarnation=member.incarnation, member=name, accuser=self._name)
                self._on_dead(dead, now)

    def _on_dead(
        self, dead: Dead, now: float, source: Address | None = None, address: Address | None = None
    ) -> None:
        """*address*: where the member is, as the message knows it (a push-pull's
        entry), for a leave; a leave by gossip carries none."""
        member = self._table.get(dead.member)
        if member is None or dead.incarnation < member.incarnation:
            return
        left = dead.accuser == dead.member
        if left and dead.member != self._name and not _is_own_leave(member, dead, address):
            self.stats.leaves_ignored += 1
            return
        self._suspicions.pop(dead.member, None)
        if member.state in (MemberState.DEAD, MemberState.LEFT):
            return
        if dead.member == self._name and not self._leaving:
            self._refute(dead.incarnation)
            return
        state = MemberState.LEFT if left else MemberState.DEAD
        new = attrs.evolve(member, incarnation=dead.incarnation, state=state)
        if dead.member == self._name:
            self._set_self(new)
        else:
            self._table.put(new)
            self._dead_at[dead.member] = now
            self._events.append(
                MemberLeft(member=new) if left else MemberDead(member=new, accuser=dead.accuser)
            )
        successor, heard = self._successors.pop(dead.member, (None, 0.0))
        window = SUCCESSOR_HEARD_PUSH_PULLS * self._config.push_pull_interval
        if successor is None or now - heard > window:
            self._disseminate(dead.member, encode_message(dead), source)
            return
        # Both travel (the successor's Alive would replace the death under
        # one key): a member that hears of the successor first holds it
        # until it hears of the death, in either order.
        self._disseminate(("predecessor", dead.member), encode_message(dead), source)
        self._on_alive(successor, now)

    def _on_user(self, message: UserBroadcast, source: Address) -> None:
        if message.origin == self._name:
            return
        origin = self._table.get(message.origin)
        if origin is None:
            # From nobody we know (push-pull brings a member's state along
            # with the member): made-up origins must not buy memory here.
            # A member we hold dead may be back: its news is taken.
            self.stats.broadcasts_dropped_unknown += 1
            return
        version = (message.boot, message.seq)
        seen = self._user_seen.get((message.origin, message.key))
        if seen is not None and seen >= version:
            return
        if seen is None and len(self._user_seen) >= MAX_USER_KEYS:
            # Forget the oldest key: a replay of it is news again, which the
            # application's own versions judge.
            self._user_seen.popitem(last=False)
            self.stats.broadcast_keys_forgotten += 1
        self._user_seen[(message.origin, message.key)] = version
        self._events.append(
            UserMessage(sender=message.origin, key=message.key, payload=message.payload)
        )
        self._disseminate(
            _user_key(message.origin, message.key), encode_message(message), source, origin.address
        )

    # -- anti-entropy -------------------------------------------------------------

    def _push_pull(self, *, join: bool) -> PushPull:
        entries = tuple(
            PushPullEntry(
                name=m.name,
                address=m.address,
                incarnation=m.incarnation,
                state=m.state,
                meta=m.meta,
            )
            for m in self._table
        )
        state = self._delegate.local_state() if self._delegate is not None else b""
        return PushPull(join=join, members=entries, user_state=state)

    def _push_pull_random(self) -> None:
        peers = self._pick(1, lambda m: m.state is MemberState.ALIVE)
        for peer in peers:
            self._request_stream(peer.address, self._push_pull(join=False), StreamPurpose.PUSH_PULL)

    def _reconnect(self, now: float) -> None:
        """Push-pull with one random failed member (Serf's reconnect)."""
        if self._leaving:
            return
        timeout = self._config.reconnect_timeout
        failed = sorted(
            name
            for name, died in self._dead_at.items()
            if now - died <= timeout
            and (m := self._table.get(name)) is not None
            and m.state is MemberState.DEAD
        )
        if not failed:
            return
        member = self._table.get(failed[int(self._rng.random() * len(failed))])
        assert member is not None
        self.stats.reconnects += 1
        self._request_stream(member.address, self._push_pull(join=False), StreamPurpose.PUSH_PULL)

    def _reap(self, now: float) -> None:
        """Forget failed members past reconnect_timeout and left ones past
        tombstone_timeout (Serf's reaper): without it every name that ever
        joined is kept, and sent in every push-pull, for good."""
        reaped: set[str] = set()
        for name, died in list(self._dead_at.items()):
            member = self._table.get(name)
            if member is None or member.state not in (MemberState.DEAD, MemberState.LEFT):
                del self._dead_at[name]
                continue
            if member.state is MemberState.DEAD:
                timeout = self._config.reconnect_timeout
            else:
                timeout = self._config.tombstone_timeout
            if now - died <= timeout or not self._table.remove(name):
                continue
            del self._dead_at[name]
            reaped.add(name)
            self.stats.members_reaped += 1
            self._events.append(MemberReaped(member=member))
        if reaped:
            for seen in [k for k in self._user_seen if k[0] in reaped]:
                del self._user_seen[seen]
            self._round = (0, 1, 0, 0)  # the table's indices moved: start a fresh round

    def _names_only_us(self, remote: PushPull) -> bool:
        """Whether a push-pull names no member but this one, as we know it:
        our own state, handed back by a peer that is this node."""
        own = self._self
        return bool(remote.members) and all(
            entry.name == self._name and entry.address == own.address for entry in remote.members
        )

    def _merge(self, remote: PushPull, now: float) -> None:
        for entry in remote.members:
            match entry.state:
                case MemberState.ALIVE:
                    alive = Alive(
                        incarnation=entry.incarnation,
                        member=entry.name,
                        address=entry.address,
                        meta=entry.meta,
                    )
                    self._on_alive(alive, now)
                case MemberState.SUSPECT | MemberState.DEAD:
                    # As memberlist: a remote death is only a suspicion here,
                    # so that the accused gets its chance to refute.
                    suspect = Suspect(
                        incarnation=entry.incarnation, member=entry.name, accuser=self._name
                    )
                    self._on_suspect(suspect, now)
                case MemberState.LEFT:
                    left = Dead(
                        incarnation=entry.incarnation, member=entry.name, accuser=entry.name
                    )
                    self._on_dead(left, now, address=entry.address)
                case _:
                    assert_never(entry.state)
        if self._delegate is not None:
            self._delegate.merge_remote_state(remote.user_state, join=remote.join)

    # -- output helpers -------------------------------------------------------------

    def _gossip(self, now: float) -> None:
        if not len(self._queue):
            return
        dead_horizon = now - self._config.gossip_to_the_dead_time

        def eligible(m: Member) -> bool:
            if m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                return True
            return (
                m.state is MemberState.DEAD and self._dead_at.get(m.name, -math.inf) > dead_horizon
            )

        for target in self._pick(self._config.gossip_nodes, eligible):
            limit = retransmit_limit(self._config.retransmit_mult, self._table.live)
            messages = self._queue.take(self._packet_room(), 0, limit, target.address)
            if messages:  # none when the target holds everything queued
                self._emit(target.address, messages)

    def _pick(self, k: int, accept: Callable[[Member], bool]) -> list[Member]:
        """Up to `k` distinct random members other than us that `accept` admits."""
        if k <= 0:
            return []
        table = self._table
        n = len(table)
        if n <= _EXACT_PICK:
            pool = [m for m in table if m.name != self._name and accept(m)]
            return self._rng.sample(pool, min(k, len(pool)))
        chosen: dict[str, Member] = {}
        for _ in range(3 * n):
            if len(chosen) >= k:
                break
            member = table.get(table.name_at(int(self._rng.random() * n)))
            if member is None or member.name == self._name or member.name in chosen:
                continue
            if accept(member):
                chosen[member.name] = member
        return list(chosen.values())

    def _packet_room(self) -> int:
        overhead = _ENVELOPE + (SEAL_OVERHEAD if self._keyring is not None else 0)
        return MAX_PACKET_BYTES - overhead

    def _send(self, dest: Address, messages: list[bytes]) -> None:
        """Send `messages` to `dest` with as many broadcasts as fit beside them."""
        room = self._packet_room() - sum(len(m) for m in messages)
        if room > 0 and len(self._queue):
            limit = retransmit_limit(self._config.retransmit_mult, self._table.live)
            messages = messages + self._queue.take(room, 0, limit, dest)
        self._emit(dest, messages)

    def _emit(self, dest: Address, messages: list[bytes]) -> None:
        data = self._seal(compound(messages))
        self.stats.packets_sent += 1
        self.stats.messages_sent += len(messages)
        self.stats.bytes_sent += len(data)
        self._datagrams.append(Datagram(dest=dest, data=data))

    def _request_stream(self, dest: Address, message: Message, purpose: StreamPurpose) -> None:
        data = self._seal(compound([encode_message(message)]))
        self.stats.streams_sent += 1
        self.stats.bytes_sent += len(data)
        self._streams.append(StreamRequest(dest=dest, data=data, purpose=purpose))

    def _seal(self, data: bytes) -> bytes:
        return self._keyring.seal(data) if self._keyring is not None else data

    def _open(self, data: bytes) -> bytes:
        if self._keyring is not None:
            if data[:1] == bytes((PLAIN_VERSION,)):
                raise AuthenticationError("plaintext while encryption is on")
            return self._keyring.open(data)
        if data[:1] == bytes((SEALED_VERSION,)):
            raise AuthenticationError("sealed data but no keyring")
        return data

    def _open_stream(self, data: bytes) -> Message | None:
        """The one message of a stream payload, or None (counted) if bad."""
        self.stats.bytes_received += len(data)
        if len(data) > MAX_PUSH_PULL_BYTES:
            self.stats.streams_dropped_malformed += 1
            return None
        try:
            messages = decode_envelope(self._open(data))
        except AuthenticationError:
            self.stats.streams_dropped_auth += 1
            return None
        except ProtocolError:
            self.stats.streams_dropped_malformed += 1
            return None
        if len(messages) != 1:
            self.stats.streams_dropped_malformed += 1
            return None
        return messages[0]


def _is_own_leave(member: Member, dead: Dead, address: Address | None) -> bool:
    """Whether a leave (a Dead by *member*'s own name) can be *member*'s own.

    A node started with a live member's name at another address is never
    taken for it (see _on_alive), so its leave must not be either.  A
    push-pull entry says where the leaver was; a gossiped leave cannot
    (a Dead has four fields, and an older peer drops a packet holding one
    with more), so there the incarnation must be the member's: the member
    leaves at its own, which only it raises, while another node of its name
    leaves at the clock of its own start.  A member that left right after
    raising its incarnation, to one that had not heard of it yet, is found
    dead instead."""
    if address is not None:
        return address == member.address
    return dead.incarnation == member.incarnation


def _packets(messages: list[bytes], room: int, first: bytes) -> list[list[bytes]]:
    """*messages* packed into as few packets of *room* bytes as greed finds,
    each led by *first* where it fits; one that fits in no packet is left out."""
    packets: list[list[bytes]] = []
    for message in messages:
        if packets and sum(map(len, packets[-1])) + len(message) <= room:
            packets[-1].append(message)
        elif len(first) + len(message) <= room:
            packets.append([first, message])
        elif len(message) <= room:
            packets.append([message])
    return packets
