"""What one node knows and decides (pure): its apps, their claims, its port pools.

Theory of operation
-------------------
The daemon is the only writer of its node's records.  An app under ``axnet run``
*attaches* (one control session per app), and gets a virtual IP and a block of
client source ports.  Every ``bind`` to a virtual address *claims* a virtual
``ip:port`` and receives a real port from the node's listener pool; ``listen``
turns the claim into a published :class:`ServiceRecord`; closing the socket, or
the app's session ending, tombstones what it published.

Version numbers make last-writer-wins work across restarts: they start from the
``now`` given at construction (in microseconds), so a restarted daemon writes
versions above everything its previous life wrote.

A supervisor that lost its daemon keeps its bindings; when it re-attaches to a
new daemon it hands them over (``adopt``) so the new daemon republishes them.
Until it has, the records peers show the new daemon of an app its lease names
are kept as they are (``merge_remote``): withdrawn, its services would be
refused everywhere for as long as its supervisor takes to come back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Sequence

import attrs

from ._leases import Binding, Lease
from ._table import (
    AppRecord,
    IPAddress,
    Labels,
    RealAddress,
    ServiceRecord,
    ServiceTable,
    VirtualAddress,
    reserved_reason,
)


class ClaimError(Exception):
    """A claim the kernel would refuse; carries the errno the app sees."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@attrs.frozen(kw_only=True)
class PortRange:
    """An inclusive range of port numbers, parsed from ``LO-HI``."""

    lo: int
    hi: int

    def __attrs_post_init__(self) -> None:
        if not (1 <= self.lo <= self.hi <= 65535):
            raise ValueError(f"port range must be LO-HI within 1-65535, got {self.lo}-{self.hi}")

    @classmethod
    def parse(cls, text: str, *, flag: str) -> PortRange:
        try:
            lo_text, hi_text = text.split("-", 1)
            lo, hi = int(lo_text), int(hi_text)
        except ValueError:
            raise ValueError(f"{flag} must look like 20000-32767, got {text!r}") from None
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(
                f"{flag} must run from a lower port to a higher within 1-65535, got {text!r}"
            )
        return cls(lo=lo, hi=hi)

    def __len__(self) -> int:
        return self.hi - self.lo + 1


#: The share of --client-ports kept out of blocks: 1/SPILL_SHARE (see
#: NodeConfig.spill_ports).
SPILL_SHARE = 16


@attrs.frozen(kw_only=True)
class NodeConfig:
    """Static facts about a node, from the daemon's command line."""

    name: str
    real_host: IPAddress
    #: Real ports handed to virtual listeners.  Below the kernel's ephemeral
    #: range, so no unrelated outgoing connection ever holds one.
    listen_ports: PortRange = PortRange(lo=20000, hi=32767)
    #: Source ports for apps' outgoing connections, split into blocks.  Must
    #: lie inside net.ipv4.ip_local_port_range: the kernel clamps a socket's
    #: IP_LOCAL_PORT_RANGE to it.
    client_ports: PortRange = PortRange(lo=32768, hi=60999)
    #: Ports per block for outgoing connections.  An app gets one when it
    #: attaches and another each time it has used them all up, up to
    #: MAX_BLOCKS (which bounds its concurrent connections to one
    #: destination, TIME_WAIT included).
    client_block: int = 256
    #: Where addresses come from for apps started without ``--ip``.
    virtual_range: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.ip_network(  # noqa: RUF009  # an immutable value
        "10.77.0.0/16"
    )

    @property
    def spill_ports(self) -> PortRange | None:
        """The top sixteenth of *client_ports*, in no block: connections of an
        app with no free port in a block of its own (it used up all of them,
        or the node had none to give) leave from here, and so are seen from
        the node's address.  Anywhere else in the kernel's range a port may
        lie in another app's block, and servers would name the connection
        after that app.  None where the range is too small to spare it."""
        size = max(self.client_block, len(self.client_ports) // SPILL_SHARE)
        if len(self.client_ports) < 4 * size:
            return None
        return PortRange(lo=self.client_ports.hi - size + 1, hi=self.client_ports.hi)

    @property
    def block_ports(self) -> PortRange:
        """Where client port blocks are cut from: *client_ports* less the spill."""
        spill = self.spill_ports
        if spill is None:
            return self.client_ports
        return PortRange(lo=self.client_ports.lo, hi=spill.lo - 1)


@attrs.define
class Claim:
    app_id: str
    virtual: VirtualAddress
    real_port: int
    listening: bool = False
    #: Where the app's socket is bound, when not on the node's address: a
    #: binding adopted from an app that a daemon at another address had.
    real_host: IPAddress | None = None


#: Client port blocks an app may hold: its first, and more as it uses them up.
MAX_BLOCKS = 8

#: A version and a time as wide as any a record carries (see widest_records).
WIDEST_VERSION = 2**63 - 1
WIDEST_TIME = 1e12


def alias_id(app_id: str, index: int) -> str:
    """The id of the record that publishes an app's block number *index* (1, 2…
    after its first): a record of its own, so that nodes of any version name
    connections from it, as they would an app's."""
    return f"{app_id}+{index}"


def alias_owner(app_id: str) -> tuple[str, int] | None:
    """(app id, block index) of an alias record's id, or None for an app's own."""
    owner, plus, index = app_id.rpartition("+")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses,
    # and an app id is any text a peer chose.
    if not plus or not (index.isascii() and index.isdigit()):
        return None
    return owner, int(index)


@attrs.define
class App:
    app_id: str
    vip: IPAddress
    block: tuple[int, int] | None
    name: str
    labels: Labels
    pid: int
    argv: tuple[str, ...]
    claims: dict[VirtualAddress, Claim] = attrs.field(factory=dict)
    #: The app's process start time (see Lease.started); 0 when unknown.
    started: int = 0
    #: Blocks taken after the first, each published by an alias record.
    more_blocks: list[tuple[int, int]] = attrs.field(factory=list)

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return ([self.block] if self.block is not None else []) + self.more_blocks

    @property
    def listening(self) -> bool:
        """Whether the app listens: only then can it accept a connection,
        and so need to know from whose block it comes."""
        return any(claim.listening for claim in self.claims.values())


@attrs.frozen(kw_only=True)
class Merged:
    """What :meth:`Node.merge_remote` did."""

    #: Others' records that changed our table (for the supervisors).
    accepted: list[AppRecord | ServiceRecord]
    #: Our own records written again above a version a peer held (to gossip).
    reasserted: list[AppRecord | ServiceRecord]
    #: Records from further ahead of our clock than MAX_AHEAD_S: not merged.
    refused: list[AppRecord | ServiceRecord] = attrs.field(factory=list)


#: How far ahead of this node's clock a peer's record may be dated.  Versions
#: are microseconds of wall-clock time (then one above the highest seen), and
#: a record from further ahead than any clock skew between hosts could never
#: be superseded by its owner: one such record would pin a service, or, naming
#: us, push every version we write past what peers accept.
MAX_AHEAD_S = 86_400.0


def _supersedes(candidate: AppRecord | ServiceRecord, current: AppRecord | ServiceRecord) -> bool:
    return (candidate.version, candidate.node) > (current.version, current.node)


class Node:
    """The node's apps, claims and records; every change returns the records it wrote."""

    def __init__(self, config: NodeConfig, *, now: float) -> None:
        self.config = config
        self.table = ServiceTable()
        self.apps: dict[str, App] = {}
        self._version = int(now * 1_000_000)
        self._vip_offset = int.from_bytes(
            hashlib.sha256(f"{config.name}/{now!r}".encode()).digest()[:8], "big"
        )
        self._claims: dict[VirtualAddress, Claim] = {}
        #: Bindings handed over after a restart that another app had claimed
        #: meanwhile (see adopt), oldest first, by the address they wait for.
        self._waiting: dict[VirtualAddress, list[Claim]] = {}
        self._ports_in_use: set[int] = set()
        self._next_port = config.listen_ports.lo
        self._blocks_in_use: set[tuple[int, int]] = set()
        #: Where the next search for a free block starts (see _take_block).
        self._block_cursor = 0
        #: What apps of a previous daemon held, kept for them until each
        #: re-attaches or the table settles (see reserve).
        self._reserved: dict[str, Lease] = {}
        #: Records of ours that peers showed us for apps held for, by app id:
        #: kept as they were until each app re-attaches (see merge_remote).
        self._held: dict[str, list[AppRecord | ServiceRecord]] = {}

    # -- helpers -------------------------------------------------------------

    def _bump(self) -> int:
        self._version += 1
        return self._version

    def _all_blocks(self) -> list[tuple[int, int]]:
        size = self.config.client_block
        lo, hi = self.config.block_ports.lo, self.config.block_ports.hi
        return [(start, min(start + size - 1, hi)) for start in range(lo, hi + 1, size)]

    def _block_free(self, block: tuple[int, int]) -> bool:
        """Inside --client-ports, out of the spill, and overlapping no block
        in use: a source port must name one app only."""
        lo, hi = block
        ports = self.config.block_ports
        held = [b for lease in self._reserved.values() for b in lease.blocks]
        return ports.lo <= lo <= hi <= ports.hi and all(
            hi < used_lo or used_hi < lo for used_lo, used_hi in [*self._blocks_in_use, *held]
        )

    def _take_block(self, wanted: tuple[int, int] | None) -> tuple[int, int] | None:
        """The block a re-attaching app had if it is still free, else a fresh one."""
        if wanted is not None and self._block_free(wanted):
            self._blocks_in_use.add(wanted)
            return wanted
        # Round the grid from past the last block given: a block an app
        # gave back goes to another only after every other one, so that
        # its tombstone has long reached every node (until it has, a peer
        # names the newer holder; see ServiceTable._blocks).
        blocks = self._all_blocks()
        for step in range(len(blocks)):
            at = (self._block_cursor + step) % len(blocks)
            if self._block_free(blocks[at]):
                self._block_cursor = at + 1
                self._blocks_in_use.add(blocks[at])
                return blocks[at]
        return None  # the app still runs; servers see the node's address for it

    def _pick_vip(self) -> IPAddress:
        network = self.config.virtual_range
        taken = {a.vip for a in self.table.apps.values() if not a.deleted}
        taken.update(lease.vip for lease in self._reserved.values())
        taken.add(self.config.real_host)  # never the node's own address
        size = network.num_addresses
        # Start at an offset derived from the node name and this daemon's
        # start, so that two nodes assigning at once rarely pick the same
        # address, nor a restarted daemon one that a surviving app (not yet
        # re-attached) still holds.
        start = self._vip_offset % max(size - 2, 1)
        for i in range(min(size - 2, 1 << 16)):
            candidate = network.network_address + 1 + (start + i) % max(size - 2, 1)
            if candidate not in taken:
                return candidate
        raise ClaimError(errno.EADDRNOTAVAIL, f"virtual range {network} is full")

    def _app_record(
        self, app: App, *, index: int = 0, deleted: bool = False, now: float = 0.0
    ) -> AppRecord:
        """The app's record (*index* 0), or the alias record of its block *index*."""
        block = app.block if index == 0 else app.more_blocks[index - 1]
        return AppRecord(
            app_id=app.app_id if index == 0 else alias_id(app.app_id, index),
            node=self.config.name,
            vip=app.vip,
            real_host=self.config.real_host,
            port_lo=block[0] if block else 0,
            port_hi=block[1] if block else 0,
            name=app.name,
            labels=app.labels,
            version=self._bump(),
            deleted=deleted,
            deleted_at=now if deleted else 0.0,
        )

    def _app_records(self, app: App, *, deleted: bool = False, now: float = 0.0) -> list[AppRecord]:
        """The app's record and the alias records of its further blocks."""
        return [
            self._app_record(app, index=index, deleted=deleted, now=now)
            for index in range(len(app.more_blocks) + 1)
        ]

    def _service_record(
        self, app: App, claim: Claim, *, deleted: bool = False, now: float = 0.0
    ) -> ServiceRecord:
        return ServiceRecord(
            virtual=claim.virtual,
            real=RealAddress(host=claim.real_host or self.config.real_host, port=claim.real_port),
            node=self.config.name,
            app_id=app.app_id,
            name=app.name,
            labels=app.labels,
            version=self._bump(),
            deleted=deleted,
            deleted_at=now if deleted else 0.0,
        )

    def _write(self, record: AppRecord | ServiceRecord) -> AppRecord | ServiceRecord:
        """Write *record*, ours, to the table.  Versions start from this
        daemon's start time, so a key may hold a higher one already: another
        node's tombstone of a service that has moved here, or an earlier
        record of ours.  Ours is written above it, or it would never win.
        (Another node's live record stays above: that is a conflict, which
        last-writer-wins settles the same way on every node.)"""
        current = self.table.current(record)
        if (
            current is not None
            and not _supersedes(record, current)
            and (current.deleted or current.node == self.config.name)
        ):
            self._version = max(self._version, current.version)
            record = attrs.evolve(record, version=self._bump())
        self.table.merge(record)
        return record

    def _write_above(
        self, version: int, fresh: AppRecord | ServiceRecord
    ) -> AppRecord | ServiceRecord:
        """Write *fresh*, ours, above *version*: another node's withdrawal
        of what we still serve, which must not win."""
        self._version = max(self._version, version)
        return self._write(attrs.evolve(fresh, version=self._bump()))

    # -- app lifecycle -------------------------------------------------------

    def widest_records(
        self, app_id: str, vip: IPAddress | None, name: str, labels: Labels
    ) -> list[AppRecord | ServiceRecord]:
        """The largest records an app with these fields could write (its
        last block's alias, the highest ports and versions, tombstones):
        what must fit in a gossip packet for its records to spread."""
        ip = vip if vip is not None else self.config.virtual_range.broadcast_address
        node, host = self.config.name, self.config.real_host
        return [
            AppRecord(
                app_id=alias_id(app_id, MAX_BLOCKS - 1),
                node=node,
                vip=ip,
                real_host=host,
                port_lo=65535,
                port_hi=65535,
                name=name,
                labels=labels,
                version=WIDEST_VERSION,
                deleted=True,
                deleted_at=WIDEST_TIME,
            ),
            ServiceRecord(
                virtual=VirtualAddress(ip=ip, port=65535),
                real=RealAddress(host=host, port=65535),
                node=node,
                app_id=app_id,
                name=name,
                labels=labels,
                version=WIDEST_VERSION,
                deleted=True,
                deleted_at=WIDEST_TIME,
            ),
        ]

    def attach(
        self,
        *,
        app_id: str,
        vip: IPAddress | None,
        name: str,
        labels: Labels,
        pid: int,
        argv: Iterable[str],
        block: tuple[int, int] | None,
        now: float,
        more_blocks: Sequence[tuple[int, int]] = (),
        started: int = 0,
    ) -> tuple[App, list[AppRecord | ServiceRecord]]:
        """Register an app; pick its virtual IP and client block when not given.

        An app re-attaching after a daemon restart names the block its
        connects use (*block*) and the others it held (*more_blocks*): its
        connections from them are still open, and servers name them by the
        blocks' records.  Each it gets back unless another app took it
        meanwhile; past MAX_BLOCKS the rest are not taken back.  What its
        lease held for it (see reserve) is its own again."""
        if app_id in self.apps:
            raise ClaimError(errno.EEXIST, f"app {app_id} is already attached")
        if "+" in app_id:
            raise ClaimError(errno.EINVAL, f"app id {app_id!r} has a '+': those name port blocks")
        if vip is not None:
            reason = reserved_reason(vip)
            if reason is None and vip == self.config.real_host:
                reason = "it is this node's real address"
            if reason is not None:
                raise ClaimError(errno.EINVAL, f"{vip} cannot be a virtual IP: {reason}")
        self._reserved.pop(app_id, None)
        chosen_vip = vip if vip is not None else self._pick_vip()
        chosen_block = self._take_block(block)
        kept: list[tuple[int, int]] = []
        for wanted in more_blocks:
            if len(kept) + 1 >= MAX_BLOCKS:
                break
            if wanted != chosen_block and self._block_free(wanted):
                self._blocks_in_use.add(wanted)
                kept.append(wanted)
        if chosen_block is None and kept:
            chosen_block = kept.pop(0)
        app = App(
            app_id=app_id,
            vip=chosen_vip,
            block=chosen_block,
            name=name,
            labels=labels,
            pid=pid,
            argv=tuple(argv),
            more_blocks=kept,
            started=started,
        )
        self.apps[app_id] = app
        return app, [self._write(r) for r in self._app_records(app)]

    def detach(self, app_id: str, *, now: float) -> list[AppRecord | ServiceRecord]:
        """The app's session ended: withdraw everything it published."""
        app = self.apps.pop(app_id, None)
        if app is None:
            return []
        for virtual in list(self._waiting):
            self._unwait(app_id, virtual)
        written: list[AppRecord | ServiceRecord] = []
        for claim in list(app.claims.values()):
            written += self._drop_claim(app, claim, now=now)
        for block in app.blocks:
            self._blocks_in_use.discard(block)
        written += [self._write(r) for r in self._app_records(app, deleted=True, now=now)]
        return written

    def more_ports(
        self, app_id: str
    ) -> tuple[tuple[int, int] | None, list[AppRecord | ServiceRecord]]:
        """Another client port block for an app that has used up its own (its
        first, for one that attached when none was free); None when none is
        left or it holds MAX_BLOCKS already."""
        app = self._app(app_id)
        if len(app.blocks) >= MAX_BLOCKS:
            return None, []
        block = self._take_block(None)
        if block is None:
            return None, []
        if app.block is None:
            app.block = block
            return block, [self._write(self._app_record(app))]
        app.more_blocks.append(block)
        return block, [self._write(self._app_record(app, index=len(app.more_blocks)))]

    # -- claims ---------------------------------------------------------------

    def _allocate_port(self, avoid: set[int], taken: Callable[[int], bool]) -> int:
        ports = self.config.listen_ports
        outside = 0
        for _ in range(len(ports)):
            port = self._next_port
            self._next_port = ports.lo if port >= ports.hi else port + 1
            if port in self._ports_in_use or port in avoid or self._reserved_port(port):
                continue
            if taken(port):
                outside += 1
                continue
            self._ports_in_use.add(port)
            return port
        held = (
            f" ({outside} of them held by other programs, or by connections still open)"
            if outside
            else ""
        )
        raise ClaimError(
            errno.EADDRNOTAVAIL,
            f"listener port pool {ports.lo}-{ports.hi} of node {self.config.name} is "
            f"exhausted{held}; give the daemon a wider --listen-ports",
        )

    def claim(
        self,
        app_id: str,
        virtual: VirtualAddress,
        *,
        real_port: int | None = None,
        real_host: IPAddress | None = None,
        avoid: Iterable[int] = (),
        taken: Callable[[int], bool] = lambda port: False,
    ) -> Claim:
        """Reserve virtual ``ip:port`` for *app_id* and give it a real port.

        ``virtual.port == 0`` asks for any port: the real port is then used as
        the virtual one too.  *real_port* adopts a port the supervisor already
        bound (after a daemon restart), at *real_host* when that is not the
        node's address (a daemon at another address had it).  A port of the pool is given only if
        it is not in *avoid* and *taken* says no one outside axnet holds it
        (another user's daemon walks the same pool).
        """
        app = self._app(app_id)
        if virtual.ip != app.vip:
            # An app's binds become its own virtual address: a claim of any
            # other (a neighbour's, loopback, a real host) would redirect
            # every app's connects to it.
            raise ClaimError(
                errno.EADDRNOTAVAIL, f"{virtual.ip} is not app {app_id}'s virtual IP {app.vip}"
            )
        if virtual.port != 0 and self._in_use(virtual, app_id):
            raise ClaimError(errno.EADDRINUSE, f"{virtual} is already in use")
        if real_port is None:
            real_port = self._allocate_port(set(avoid), taken)
        else:
            holder = next(
                (c.app_id for c in self._claims.values() if c.real_port == real_port), app_id
            )
            if holder != app_id:
                # The port is another app's socket: two claims of one port
                # would give it back to the pool at the first release.
                raise ClaimError(
                    errno.EADDRNOTAVAIL, f"real port {real_port} is held by app {holder}"
                )
            self._ports_in_use.add(real_port)
        if virtual.port == 0:
            virtual = VirtualAddress(ip=virtual.ip, port=real_port)
            if self._in_use(virtual, app_id):
                self._ports_in_use.discard(real_port)
                raise ClaimError(errno.EADDRINUSE, f"{virtual} is already in use")
        if real_host == self.config.real_host:
            real_host = None
        claim = Claim(app_id=app_id, virtual=virtual, real_port=real_port, real_host=real_host)
        self._claims[virtual] = claim
        app.claims[virtual] = claim
        return claim

    def adopt(
        self,
        app_id: str,
        virtual: VirtualAddress,
        *,
        real_port: int,
        listening: bool,
        real_host: IPAddress | None = None,
    ) -> list[AppRecord | ServiceRecord]:
        """Take over a binding the app's supervisor kept across a daemon restart.

        A new daemon does not know the binding until its supervisor
        re-attaches: meanwhile another app may claim the same address.  The
        adopted binding then waits (EADDRINUSE is raised) and is published
        as soon as the other claim is released, since the app still holds
        its socket: dropped, it would stay unpublished for good.  Its record
        names *real_host*, where the socket is bound, if a daemon at another
        address had it: the socket cannot move.
        """
        try:
            self.claim(app_id, virtual, real_port=real_port, real_host=real_host)
        except ClaimError as exc:
            if exc.errno == errno.EADDRINUSE:
                waiting = Claim(
                    app_id=app_id,
                    virtual=virtual,
                    real_port=real_port,
                    listening=listening,
                    real_host=real_host,
                )
                self._waiting.setdefault(virtual, []).append(waiting)
            raise
        return self.listen(app_id, virtual) if listening else []

    def _unwait(self, app_id: str, virtual: VirtualAddress) -> None:
        waiting = [w for w in self._waiting.get(virtual, []) if w.app_id != app_id]
        if waiting:
            self._waiting[virtual] = waiting
        else:
            self._waiting.pop(virtual, None)

    def _adopt_waiting(self, virtual: VirtualAddress) -> list[AppRecord | ServiceRecord]:
        """The oldest binding waiting for *virtual* (see adopt), now free."""
        while waiting := self._waiting.get(virtual):
            first = waiting.pop(0)
            if not waiting:
                del self._waiting[virtual]
            if first.app_id in self.apps:
                with contextlib.suppress(ClaimError):  # raised only if taken again: it waits
                    return self.adopt(
                        first.app_id,
                        virtual,
                        real_port=first.real_port,
                        listening=first.listening,
                        real_host=first.real_host,
                    )
        return []

    def _in_use(self, virtual: VirtualAddress, app_id: str) -> bool:
        if virtual in self._claims:
            return True
        if any(b.virtual == virtual for lease in self._reserved.values() for b in lease.bindings):
            return True  # its app still holds the socket: EADDRINUSE, as natively
        record = self.table.resolve(virtual.ip, virtual.port)
        # The app's own listener, held for it across the restart, is its to take back.
        return record is not None and all(record is not held for held in self._held.get(app_id, ()))

    def listen(self, app_id: str, virtual: VirtualAddress) -> list[AppRecord | ServiceRecord]:
        """Publish the service behind a claim."""
        app = self._app(app_id)
        claim = app.claims.get(virtual)
        if claim is None:
            raise ClaimError(errno.EINVAL, f"{virtual} was never claimed by app {app_id}")
        if claim.listening:
            return []
        claim.listening = True
        return [self._write(self._service_record(app, claim))]

    def release(
        self, app_id: str, virtual: VirtualAddress, *, now: float
    ) -> list[AppRecord | ServiceRecord]:
        """The socket behind a claim was closed."""
        app = self._app(app_id)
        self._unwait(app_id, virtual)
        claim = app.claims.get(virtual)
        if claim is None:
            return []
        return self._drop_claim(app, claim, now=now)

    def _drop_claim(self, app: App, claim: Claim, *, now: float) -> list[AppRecord | ServiceRecord]:
        app.claims.pop(claim.virtual, None)
        self._claims.pop(claim.virtual, None)
        self._ports_in_use.discard(claim.real_port)
        written: list[AppRecord | ServiceRecord] = []
        if claim.listening:
            written.append(self._write(self._service_record(app, claim, deleted=True, now=now)))
        return written + self._adopt_waiting(claim.virtual)

    def _app(self, app_id: str) -> App:
        app = self.apps.get(app_id)
        if app is None:
            raise ClaimError(errno.ENOENT, f"no app {app_id} is attached to this node")
        return app

    # -- leases ---------------------------------------------------------------

    def leases(self) -> list[Lease]:
        """What every app holds (see axnet._leases), held ones included: a
        daemon restarted again before they re-attached keeps them too."""
        return [
            Lease(
                app_id=app.app_id,
                pid=app.pid,
                started=app.started,
                vip=app.vip,
                blocks=tuple(app.blocks),
                bindings=tuple(
                    Binding(virtual=claim.virtual, real_port=claim.real_port)
                    for claim in app.claims.values()
                ),
            )
            for app in self.apps.values()
        ] + list(self._reserved.values())

    def reserve(self, leases: Iterable[Lease]) -> None:
        """Hold what apps of a previous daemon still hold: their blocks, their
        virtual IPs and their bindings are given to no other app until each
        re-attaches (see attach) or end_reservations is called."""
        for lease in leases:
            if lease.app_id not in self.apps:
                self._reserved[lease.app_id] = lease

    def end_reservations(self, *, now: float) -> tuple[list[str], list[AppRecord | ServiceRecord]]:
        """The table has settled: whoever has not re-attached by now will
        not be waited for.  Returns their app ids, and the withdrawal of the
        records held for them (see merge_remote)."""
        ended = list(self._reserved)
        self._reserved.clear()
        withdrawn: list[AppRecord | ServiceRecord] = []
        for app_id in list(self._held):
            withdrawn += self.end_hold(app_id, now=now)
        return ended, withdrawn

    def end_hold(self, app_id: str, *, now: float) -> list[AppRecord | ServiceRecord]:
        """The app re-attached and adopted the bindings it kept: the records
        held for it that it did not write again (a listener it closed while
        no daemon ran, a block it did not get back) are withdrawn."""
        withdrawn: list[AppRecord | ServiceRecord] = []
        for record in self._held.pop(app_id, []):
            if self.table.current(record) is record:
                tomb = attrs.evolve(record, version=self._bump(), deleted=True, deleted_at=now)
                withdrawn.append(self._write(tomb))
        return withdrawn

    def _held_for(self, record: AppRecord | ServiceRecord) -> str | None:
        """The app held for (see reserve) whose record *record* is, if any."""
        app_id = record.app_id
        if isinstance(record, AppRecord) and (alias := alias_owner(app_id)) is not None:
            app_id = alias[0]
        return app_id if app_id in self._reserved else None

    def _reserved_port(self, port: int) -> bool:
        return any(b.real_port == port for lease in self._reserved.values() for b in lease.bindings)

    # -- records from elsewhere ------------------------------------------------

    def merge_remote(self, records: Iterable[AppRecord | ServiceRecord], *, now: float) -> Merged:
        """Merge records gossiped by other nodes.

        Others' records are merged last-writer-wins.  Records that claim to be
        ours are never taken as they are: when a peer holds a version of one of
        our records above ours (it declared us dead during a partition and
        tombstoned them, or it remembers a previous life of this node), or a
        different record at the same version, we write our truth again above
        that version: the live record if we still own it, else a tombstone.
        A live record of an app held for after a restart (see reserve) is
        the exception: its app still runs and serves it, and only the app
        knows what it still serves.  It is kept as it is, neither withdrawn
        nor written again, until the app re-attaches (see end_hold) or the
        holding ends (see end_reservations).
        """
        accepted: list[AppRecord | ServiceRecord] = []
        reasserted: list[AppRecord | ServiceRecord] = []
        refused: list[AppRecord | ServiceRecord] = []
        horizon = now + MAX_AHEAD_S
        for record in records:
            if record.version > horizon * 1_000_000 or (
                record.deleted and record.deleted_at > horizon
            ):
                refused.append(record)
                continue
            if record.node != self.config.name:
                if record.deleted and (fresh := self._owned_record(record)) is not None:
                    # Another node withdrew what we serve: its old record of
                    # a service that has moved here since, come late, or
                    # that of a rival that won a conflict and went.  Ours
                    # stands, above it.
                    current = self.table.current(record)
                    if current is None or _supersedes(record, current):
                        reasserted.append(self._write_above(record.version, fresh))
                    continue
                if self.table.merge(record):
                    accepted.append(record)
                continue
            current = self.table.current(record)
            # A different record at our very version (another node's
            # tombstone of ours, version + 1, against our own next write)
            # ties: neither would ever win, so we write above both.
            tie = current is not None and record.version == current.version and record != current
            if current is not None and not tie and not _supersedes(record, current):
                continue
            # Every version we write from now on must beat the one the peer holds.
            self._version = max(self._version, record.version)
            fresh = self._owned_record(record)
            if fresh is not None:
                reasserted.append(self._write(fresh))
            elif record.deleted:
                self.table.merge(record)
            elif (holder := self._held_for(record)) is not None:
                if self.table.merge(record):
                    self._held.setdefault(holder, []).append(record)
                    accepted.append(record)
            else:
                tomb = attrs.evolve(record, version=self._bump(), deleted=True, deleted_at=now)
                reasserted.append(self._write(tomb))
        return Merged(accepted=accepted, reasserted=reasserted, refused=refused)

    def _owned_record(self, record: AppRecord | ServiceRecord) -> AppRecord | ServiceRecord | None:
        """A fresh version of the live record we own under *record*'s key, if any."""
        if isinstance(record, ServiceRecord):
            claim = self._claims.get(record.virtual)
            if claim is None or not claim.listening:
                return None
            return self._service_record(self.apps[claim.app_id], claim)
        app = self.apps.get(record.app_id)
        if app is not None:
            return self._app_record(app)
        alias = alias_owner(record.app_id)
        if alias is None or (app := self.apps.get(alias[0])) is None:
            return None
        index = alias[1]
        return self._app_record(app, index=index) if 1 <= index <= len(app.more_blocks) else None

    def forget_node(self, node: str, *, now: float, spare_host: IPAddress | None = None) -> Merged:
        """A member died or left: tombstone its records locally (``accepted``).
        Where its record had won a conflict over an address we serve too
        (both bound it at once), ours is written above it instead
        (``reasserted``: for the cluster), as when its app goes.

        Records served from *spare_host* are kept: those of a member that
        already took the name back from there (its host restarted at a new
        address before this life was found dead)."""
        withdrawn: list[AppRecord | ServiceRecord] = []
        reasserted: list[AppRecord | ServiceRecord] = []
        for record in self.table.records_of_node(node):
            host = record.real.host if isinstance(record, ServiceRecord) else record.real_host
            if spare_host is not None and host == spare_host:
                continue
            tomb = attrs.evolve(record, version=record.version + 1, deleted=True, deleted_at=now)
            fresh = self._owned_record(record) if isinstance(record, ServiceRecord) else None
            if fresh is not None:
                reasserted.append(self._write_above(tomb.version, fresh))
            elif self.table.merge(tomb):
                withdrawn.append(tomb)
        return Merged(accepted=withdrawn, reasserted=reasserted, refused=[])

    def republish(self) -> list[AppRecord | ServiceRecord]:
        """Fresh versions of every live record of ours (after a restart or rejoin)."""
        written: list[AppRecord | ServiceRecord] = []
        for app in self.apps.values():
            written += [self._write(r) for r in self._app_records(app)]
            for claim in app.claims.values():
                if claim.listening:
                    written.append(self._write(self._service_record(app, claim)))
        return written
