"""SimNet: many Swim cores over a simulated network, in virtual time.

Theory of operation: one heap of timed deliveries (datagrams, stream
exchanges, timer ticks) drives every core; virtual time jumps from one entry
to the next, so a minute of cluster life costs only the work of its packets.
Each core's next tick is scheduled from `next_deadline()`; a stale tick
entry (superseded by an earlier deadline) is skipped when popped.
Deterministic for a given `rng`: one Rng drives loss, delay jitter and every
core.

Network faults: per-link or global loss probability, base delay plus jitter,
partitions (cut pairs, built from groups), crashed members (silent; their
streams are refused) and slow members (CPU-starved: everything delivered to
them is processed `slow` seconds late).

Large clusters: `bootstrap()` gives every member the same full member list
through one shared, read-only table (see swim._state), as if the cluster had
converged; 10 000 members then cost O(N) memory, not O(N²).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from typing import TypeAlias

import attrs

from ._config import Config
from ._core import StateDelegate, Swim
from ._events import Event, StreamPurpose
from ._keyring import Keyring
from ._messages import Address, MemberState
from ._rng import Rng
from ._state import SharedView

_TICK = 0
_DATAGRAM = 1
_STREAM = 2
_STREAM_REPLY = 3
_STREAM_FAIL = 4

Observer: TypeAlias = Callable[[float, str, Event], None]


@attrs.define(kw_only=True, slots=True)
class _Node:
    swim: Swim
    epoch: int
    tick_at: float = math.inf
    crashed: bool = False
    slow: float = 0.0


class SimNet:
    """A deterministic simulated network of Swim members."""

    def __init__(
        self,
        *,
        rng: Rng,
        config: Config | None = None,
        delay: float = 0.002,
        jitter: float = 0.001,
        loss: float = 0.0,
        observer: Observer | None = None,
        record: bool = True,
    ) -> None:
        self.rng = rng
        self.config = config if config is not None else Config.lan()
        self.now = 0.0
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.observer = observer
        #: (time, member, event) of every event, when `record` is True.
        self.log: list[tuple[float, str, Event]] = []
        self._record = record
        self._nodes: dict[str, _Node] = {}
        self._by_address: dict[Address, str] = {}
        self._heap: list[tuple[float, int, int, tuple[object, ...]]] = []
        self._counter = itertools.count()
        self._epochs = itertools.count(1)
        self._cut: set[frozenset[str]] = set()
        self._link_loss: dict[frozenset[str], float] = {}
        self.datagrams_delivered = 0
        self.datagrams_dropped = 0

    # -- building -----------------------------------------------------------------

    def add(
        self,
        name: str,
        *,
        incarnation: int = 1,
        meta: bytes = b"",
        keyring: Keyring | None = None,
        delegate: StateDelegate | None = None,
        config: Config | None = None,
    ) -> Swim:
        """Start a member at address 10.x.y.z:7946 derived from its index."""
        old = self._nodes.get(name)
        if old is not None and not old.crashed:
            raise ValueError(f"member {name!r} is already running")
        if old is not None:
            address = old.swim.local_member.address
        else:
            index = len(self._nodes) + 1
            address = (f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}", 7946)
        swim = Swim(
            name=name,
            address=address,
            config=config if config is not None else self.config,
            rng=self.rng,
            now=self.now,
            incarnation=incarnation,
            meta=meta,
            delegate=delegate,
            keyring=keyring,
        )
        self._nodes[name] = _Node(swim=swim, epoch=next(self._epochs))
        self._by_address[address] = name
        self._schedule(name)
        return swim

    def bootstrap(self) -> None:
        """Give every member the full member list, as if converged (shared table)."""
        view = SharedView([node.swim.local_member for node in self._nodes.values()])
        for name, node in self._nodes.items():
            node.swim._preload(view)
            node.tick_at = math.inf
            self._schedule(name)

    def join(self, name: str, seeds: Iterable[str]) -> None:
        swim = self[name]
        swim.join([self[s].local_member.address for s in seeds], self.now)
        self._flush(name)

    def __getitem__(self, name: str) -> Swim:
        return self._nodes[name].swim

    @property
    def names(self) -> list[str]:
        return list(self._nodes)

    def running(self) -> list[str]:
        return [n for n, node in self._nodes.items() if not node.crashed]

    # -- faults -------------------------------------------------------------------

    def crash(self, name: str) -> None:
        """Stop a member silently (no leave)."""
        self._nodes[name].crashed = True

    def restart(
        self, name: str, *, seeds: Iterable[str] = (), incarnation: int | None = None
    ) -> Swim:
        """Restart a crashed member with a fresh core; incarnation defaults to old + 1."""
        old = self._nodes[name]
        if not old.crashed:
            raise ValueError(f"member {name!r} is running; crash it first")
        inc = incarnation if incarnation is not None else old.swim.local_member.incarnation + 1
        swim = self.add(
            name, incarnation=inc, meta=old.swim.local_member.meta, keyring=old.swim.keyring
        )
        seeds = list(seeds)
        if seeds:
            self.join(name, seeds)
        return swim

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between members of different groups."""
        sets = [set(g) for g in groups]
        for i, a in enumerate(sets):
            for b in sets[i + 1 :]:
                for x in a:
                    for y in b:
                        self._cut.add(frozenset((x, y)))

    def heal(self) -> None:
        self._cut.clear()

    def set_link_loss(self, a: str, b: str, probability: float) -> None:
        self._link_loss[frozenset((a, b))] = probability

    def set_slow(self, name: str, lag: float) -> None:
        """Process everything delivered to `name` `lag` seconds late."""
        self._nodes[name].slow = lag

    # -- running ------------------------------------------------------------------

    def run_for(self, duration: float) -> None:
        self._run_to(self.now + duration)

    def run_until(
        self, predicate: Callable[[], bool], limit: float, *, check_every: float = 0.05
    ) -> bool:
        """Run until `predicate()` holds (checked every `check_every` virtual
        seconds) or `limit` virtual seconds have passed; returns whether it held."""
        end = self.now + limit
        while True:
            if predicate():
                return True
            if self.now >= end:
                return False
            self._run_to(min(end, self.now + check_every))

    def _run_to(self, end: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= end:
            when, _, kind, args = heapq.heappop(heap)
            self.now = when
            self._deliver(kind, args)
        self.now = max(self.now, end)

    # -- observation helpers ------------------------------------------------------------

    def state_of(self, observer: str, name: str) -> MemberState | None:
        member = self[observer].member(name)
        return member.state if member is not None else None

    def all_see(self, name: str, state: MemberState) -> bool:
        """Every running member other than `name` sees `name` in `state`."""
        return all(self.state_of(o, name) is state for o in self.running() if o != name)

    def converged(self) -> bool:
        """Every running member sees every other running member alive."""
        live = self.running()
        return all(self.state_of(o, n) is MemberState.ALIVE for o in live for n in live if o != n)

    # -- internals ----------------------------------------------------------------

    def _push(self, when: float, kind: int, args: tuple[object, ...]) -> None:
        heapq.heappush(self._heap, (when, next(self._counter), kind, args))

    def _schedule(self, name: str) -> None:
        node = self._nodes[name]
        deadline = max(node.swim.next_deadline(), self.now)
        if deadline < node.tick_at:
            node.tick_at = deadline
            self._push(deadline, _TICK, (name, node.epoch))

    def _latency(self, dest: _Node) -> float:
        return self.delay + self.jitter * self.rng.random() + dest.slow

    def _deliver(self, kind: int, args: tuple[object, ...]) -> None:
        if kind == _TICK:
            name, epoch = args
            assert isinstance(name, str)
            node = self._nodes[name]
            if node.epoch != epoch or node.crashed or node.tick_at != self.now:
                return
            node.tick_at = math.inf
            node.swim.tick(self.now)
            self._flush(name)
        elif kind == _DATAGRAM:
            dest, src, data = args
            assert isinstance(dest, str) and isinstance(data, bytes)
            node = self._nodes[dest]
            if node.crashed:
                return
            self.datagrams_delivered += 1
            node.swim.handle_datagram(src, data, self.now)  # type: ignore[arg-type]  # heap payloads are untyped tuples
            self._flush(dest)
        elif kind == _STREAM:
            src, dest, data, timeout = args
            assert isinstance(src, str) and isinstance(dest, str) and isinstance(data, bytes)
            assert isinstance(timeout, float)
            node = self._nodes[dest]
            src_node = self._nodes[src]
            if node.crashed or frozenset((src, dest)) in self._cut:
                wait = self.delay if node.crashed else timeout
                self._push(self.now + wait, _STREAM_FAIL, (src, src_node.epoch, dest))
                return
            reply = node.swim.handle_stream(src_node.swim.local_member.address, data, self.now)
            self._flush(dest)
            if reply:
                self._push(
                    self.now + self._latency(src_node),
                    _STREAM_REPLY,
                    (src, src_node.epoch, dest, reply),
                )
            else:
                self._push(self.now + self.delay, _STREAM_FAIL, (src, src_node.epoch, dest))
        elif kind == _STREAM_REPLY:
            src, epoch, dest, answer = args
            assert isinstance(src, str) and isinstance(dest, str) and isinstance(answer, bytes)
            node = self._nodes[src]
            if node.epoch != epoch or node.crashed:
                return
            node.swim.handle_stream_reply(self[dest].local_member.address, answer, self.now)
            self._flush(src)
        elif kind == _STREAM_FAIL:
            src, epoch, dest = args
            assert isinstance(src, str) and isinstance(dest, str)
            node = self._nodes[src]
            if node.epoch != epoch or node.crashed:
                return
            node.swim.stream_failed(self[dest].local_member.address, self.now)
            self._flush(src)

    def _flush(self, name: str) -> None:
        node = self._nodes[name]
        swim = node.swim
        src = swim.local_member.address
        for datagram in swim.take_datagrams():
            dest = self._by_address.get(datagram.dest)
            if dest is None:
                self.datagrams_dropped += 1
                continue
            link = frozenset((name, dest))
            loss = self._link_loss.get(link, self.loss)
            if link in self._cut or (loss > 0 and self.rng.random() < loss):
                self.datagrams_dropped += 1
                continue
            self._push(
                self.now + self._latency(self._nodes[dest]), _DATAGRAM, (dest, src, datagram.data)
            )
        for request in swim.take_stream_requests():
            dest = self._by_address.get(request.dest)
            if dest is None:
                continue
            timeout = swim.config.tcp_timeout
            if request.purpose is StreamPurpose.PING:
                timeout = min(timeout, swim.config.probe_interval)
            self._push(self.now + self.delay, _STREAM, (name, dest, request.data, timeout))
        events = swim.take_events()
        if events:
            for event in events:
                if self._record:
                    self.log.append((self.now, name, event))
                if self.observer is not None:
                    self.observer(self.now, name, event)
        self._schedule(name)
