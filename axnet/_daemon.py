"""``axnet daemon``: the node.  Owns the service table and the control API.

Theory of operation
-------------------
Every app under ``axnet run`` keeps one control session open.  The session is
the app's lease: when the connection closes (the app exited, or its supervisor
was killed) the node withdraws what the app published.  Every change to the
table, local or learned from the cluster, is pushed to every session, so
supervisors decide ``connect`` from their own copy without asking us.

The daemon never touches an application's syscalls.  If it dies, supervisors
go on with their last copy of the table and re-attach, handing over their
bindings, as soon as a daemon answers again.  For SETTLE_S after its start a
daemon's table may still lack live services (their supervisors have not
re-attached yet, the cluster's records are still on their way): its attach
replies say for how long more (``settling``), and a re-attaching supervisor
keeps what it knew and the new table lacks until then.  While the start-up
join of a clustered daemon is still under way, settling lasts until it is
over (at most JOIN_SETTLE_MAX_S); the daemon pushes ``settled`` when it is.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs
import trio

from . import _leasefile
from ._control import (
    NO_GOSSIP,
    Connection,
    ControlError,
    command_for,
    control_path,
    prepare_runtime_dir,
    serve_control,
)
from ._dirlock import DirLock
from ._node import MAX_BLOCKS, ClaimError, Merged, Node, NodeConfig, alias_owner
from ._portprobe import port_taken
from ._stderr import say
from ._table import (
    TOMBSTONE_SWEEP_S,
    AppRecord,
    RealAddress,
    ServiceRecord,
    VirtualAddress,
    ip_address,
    labels_from,
)
from ._version import __version__
from ._views import app_view, service_view
from ._wire import (
    RECORDS_PER_FRAME,
    WireError,
    block_from_wire,
    int_from_wire,
    labels_from_wire,
    port_from_wire,
    record_to_wire,
    text_from_wire,
)

log = logging.getLogger("axnet.daemon")

#: Seconds after a daemon's start during which its table may still lack live
#: records: supervisors re-attach within 2 s (their RECONNECT_MAX_S), and a
#: join's push-pull brings the cluster's records a moment after the start.
SETTLE_S = 5.0
#: While a clustered daemon's start-up join is still under way (its seeds do
#: not answer), the cluster's records are missing for as long: settling lasts
#: until the join is over, but at most this long after the start (what a
#: supervisor takes at most, its SETTLE_MAX_S).
JOIN_SETTLE_MAX_S = 60.0


class Cluster(Protocol):
    """What the daemon needs from the gossip layer (see ``axnet._gossip``)."""

    def publish(self, records: Sequence[AppRecord | ServiceRecord]) -> None: ...
    async def deliver(self, records: Sequence[AppRecord | ServiceRecord]) -> list[str]: ...
    def members(self) -> list[dict[str, Any]]: ...
    async def join(self, seeds: Sequence[str]) -> int: ...
    async def leave(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def name_conflicts(self) -> list[str]: ...
    def unresolved_seeds(self) -> dict[str, str]: ...
    def self_seeds(self) -> list[str]: ...
    def unfit(self, record: AppRecord | ServiceRecord) -> str | None: ...
    def joining(self) -> bool: ...
    async def wait_joined(self) -> None: ...


#: How long a grant of client ports (an attach, more ports) waits for its
#: record to reach every member and every supervisor here.  Past it, the
#: app goes on and gossip carries the record; who did not answer in time is
#: not waited for again until it answers one (a member down but not yet
#: found out costs one app start that long, not each).
PUSH_FLUSH_S = 0.25
#: Requests of one session read ahead of the one being handled.
REQUESTS_QUEUED = 16
#: Shortest time between two writes of the lease file: a burst of app starts
#: (or of one app's binds) is written once, at most this long after it began.
LEASE_WRITE_GAP_S = 0.02
#: The file is written whole, so a node with thousands of bindings takes
#: milliseconds a write: the gap is at least this many times as long as the
#: last write took, which keeps the writes to a small share of the daemon's time.
LEASE_WRITE_GAP_FACTOR = 10
#: ... and at most this long, however slow the last write was (a disk
#: stalled for seconds): binds and releases meanwhile wait to be written.
LEASE_WRITE_GAP_MAX_S = 1.0
#: After a write failed (a full disk), how long until the next try when
#: nothing changes meanwhile: once the disk has room again, a daemon killed
#: on a quiet node still leaves its leases for the next one.
LEASE_RETRY_S = 2.0
#: Bounds of a join request's seeds (a seed is HOST[:PORT]; a DNS name is at
#: most 253 characters).
MAX_SEEDS = 64
MAX_SEED_CHARS = 300


@attrs.frozen(kw_only=True)
class DaemonConfig:
    node: NodeConfig
    runtime_dir: Path
    #: Say on stderr, in one line, when the daemon serves (`axnet daemon`).
    announce: bool = False


Record = AppRecord | ServiceRecord


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.node = Node(config.node, now=time.time())
        self.sessions: dict[str, Connection] = {}
        self.cluster: Cluster | None = None
        self.started = time.monotonic()
        self._stop = trio.Event()
        self._leases_changed = trio.Event()
        #: One write of the lease file at a time, off the loop (see _save_leases).
        self._lease_lock = trio.Lock()
        self._lease_error: str | None = None
        self._dirlock: DirLock | None = None
        self._dir_lost = False
        self._lease_path = _leasefile.lease_path(config.runtime_dir)

    # -- publishing ---------------------------------------------------------

    async def changed(
        self,
        records: Sequence[Record],
        *,
        local: bool = True,
        wait_s: float = 0.0,
        asker: Connection | None = None,
    ) -> None:
        """Push *records* to every supervisor, and to the cluster when ours.

        With *wait_s*, ours also go straight to every member rather than by
        gossip's rounds alone, and this waits (*wait_s* at most) until the
        members acknowledged them and every supervisor here whose app
        listens applied them: for a new client port block, which servers
        here and on every node must know before the app's first connection
        reaches them, or they name its node instead of the app.  Other
        supervisors accept nothing that the block names; by their next
        listen they have the push, which comes first on their stream.  Nor
        is the session whose request made them, *asker*, waited for: the
        push reaches it before the reply too.
        """
        if not records:
            return
        for record in records:
            log.info("record %s", _describe(record))
        cluster = self.cluster if local else None
        if cluster is not None and not wait_s:
            cluster.publish(records)
        for chunk in _framed([record_to_wire(r) for r in records]):
            for conn in list(self.sessions.values()):
                await conn.push_records(chunk)
        if not wait_s:
            return
        # Every supervisor of a listening app is pinged; one that left a
        # ping unanswered (one stopped with Ctrl-Z) is not waited for until
        # it answers again, or it would hold up every app start by wait_s.
        pings = []
        for app_id, conn in list(self.sessions.items()):
            app = self.node.apps.get(app_id)
            if conn is asker or app is None or not app.listening:
                continue
            if conn.answers_pings:  # else it has a ping to answer still
                pings.append((conn, await conn.ping()))
        with trio.move_on_after(wait_s):
            if cluster is not None:
                # Sent before deliver's first checkpoint: a timeout cuts
                # only the wait for acks short.
                await cluster.deliver(records)
            for conn, seq in pings:
                await conn.wait_applied(seq)

    def _ready_line(self, path: Path) -> str:
        stop = command_for("axnet stop", path.parent)
        return (
            f"node {self.config.node.name}, apps' listeners on {self.config.node.real_host}, "
            f"control socket {path} (stop it with: {stop})"
        )

    # -- control API --------------------------------------------------------

    async def handle(self, conn: Connection, _: Mapping[str, Any]) -> None:
        # Requests are handled one at a time, and an attach or a grant of
        # more ports waits for every other supervisor's answer to a ping: so
        # answers are taken as they come, beside the requests.  Two apps
        # granted blocks at once each wait for the other's answer.
        send, receive = trio.open_memory_channel[dict[str, Any]](REQUESTS_QUEUED)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._take_answers, conn, send)
            await self._serve_requests(conn, receive)

    @staticmethod
    async def _take_answers(
        conn: Connection, requests: trio.MemorySendChannel[dict[str, Any]]
    ) -> None:
        """Read the session: answers to pings are taken here, requests
        queued for :meth:`_serve_requests` (a full queue stops the reading)."""
        async with requests:
            async for message in conn.messages():
                seq = message.get("seq")
                if message.get("op") == "applied" and type(seq) is int:
                    conn.applied(seq)  # no reply
                else:
                    await requests.send(message)

    async def _serve_requests(
        self, conn: Connection, requests: trio.MemoryReceiveChannel[dict[str, Any]]
    ) -> None:
        app_id: str | None = None
        try:
            async for request in requests:
                op = request.get("op")
                try:
                    if op == "applied":  # malformed: a good one is taken as it comes
                        conn.applied(int_from_wire(request.get("seq") or 0))
                    elif op == "attach":
                        if app_id is not None:
                            raise ClaimError(errno.EEXIST, "this session is already attached")
                        app_id = await self._attach(conn, request)
                        self._leases_changed.set()
                    elif op in ("claim", "listen", "release", "more-ports"):
                        if app_id is None:
                            raise ClaimError(errno.EPERM, f"'{op}' needs an attached session")
                        await self._session_op(conn, app_id, op, request)
                        self._leases_changed.set()
                    else:
                        await self._command(conn, str(op), request)
                except ClaimError as exc:
                    await conn.fail(request, str(exc), exc.errno)
                except (
                    ControlError,
                    ValueError,
                    WireError,
                    KeyError,
                    TypeError,
                    ArithmeticError,
                ) as exc:
                    await conn.fail(request, f"bad request '{op}': {exc}", errno.EINVAL)
        finally:
            if app_id is not None:
                self.sessions.pop(app_id, None)
                with trio.CancelScope(shield=True):
                    await self.changed(self.node.detach(app_id, now=time.time()))
                self._leases_changed.set()
                log.info("app detached app=%s", app_id)

    async def _attach(self, conn: Connection, request: Mapping[str, Any]) -> str:
        # Everything is read and checked before the node changes: a bad
        # request is refused whole, never half attached.
        app_id = text_from_wire(request["app_id"], "app id")
        vip_text = request.get("vip")
        vip = ip_address(str(vip_text)) if vip_text else None
        block = request.get("block")
        wanted_block = block_from_wire(block) if block else None
        # The other blocks a supervisor held before a daemon restart: its
        # connections from them are still open.
        more = request.get("more_blocks") or []
        if not isinstance(more, list) or len(more) >= MAX_BLOCKS:
            raise WireError(f"more_blocks: a list of at most {MAX_BLOCKS - 1} [lo, hi] pairs")
        more_blocks = [block_from_wire(b) for b in more]
        pid = int_from_wire(request.get("pid") or 0)
        name = text_from_wire(request.get("name") or "", "name")
        labels = labels_from(labels_from_wire(request.get("labels") or []))
        if self.cluster is not None:
            # Records that do not fit in a packet spread by push-pull only,
            # seconds late: the app's first connections would be named
            # after its node.  Refused as the app starts, where the user can
            # act on it; an app running already (re-attaching to a daemon
            # that clusters now, or with a key) is taken, and the log says.
            reattach = bool(block or request.get("claims"))
            for record in self.node.widest_records(app_id, vip, name, labels):
                reason = self.cluster.unfit(record)
                if reason is not None and not reattach:
                    raise ClaimError(
                        errno.EMSGSIZE,
                        f"the app's name and labels are too long to gossip ({reason}): "
                        "give it fewer or shorter labels",
                    )
                if reason is not None:
                    log.warning(
                        "app re-attached app=%s with records too large to gossip (%s): "
                        "they spread by push-pull only",
                        app_id,
                        reason,
                    )
                    break
        # Bindings a supervisor kept across a daemon restart, with the real
        # address each is bound to (an older supervisor does not say: the
        # node's).
        host = self.config.node.real_host
        wire_claims = request.get("claims") or []
        hosts = request.get("claim_hosts") or []
        if len(hosts) != len(wire_claims):
            hosts = [host] * len(wire_claims)
        claims = [
            (
                VirtualAddress(ip=ip_address(str(vip_s)), port=port_from_wire(vport)),
                port_from_wire(real),
                bool(on),
                ip_address(str(bound)),
            )
            for (vip_s, vport, real, on), bound in zip(wire_claims, hosts, strict=True)
        ]
        app, written = self.node.attach(
            app_id=app_id,
            vip=vip,
            name=name,
            labels=labels,
            pid=pid,
            argv=[str(a) for a in request.get("argv") or []],
            block=wanted_block,
            more_blocks=more_blocks,
            now=time.time(),
            started=_leasefile.process_started(pid) or 0,
        )
        try:
            for virtual, real_port, listening, bound_at in claims:
                if listening and bound_at != host:
                    # Its socket stays where a daemon at another address
                    # bound it: published there, which apps of this node
                    # reach, and other nodes may not.
                    log.warning(
                        "app re-attached app=%s vip=%s name=%s: service=%s listens on %s, "
                        "not on this node's address %s; other nodes may not reach it there: "
                        "restart the app to serve at %s",
                        app_id,
                        app.vip,
                        name,
                        virtual,
                        RealAddress(host=bound_at, port=real_port),
                        host,
                        host,
                    )
                try:
                    written += self.node.adopt(
                        app_id,
                        virtual,
                        real_port=real_port,
                        listening=listening,
                        real_host=bound_at,
                    )
                except ClaimError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        # Another app claimed it while this one was away: it
                        # waits, and is published once that one releases it.
                        log.warning(
                            "adopt waits app=%s virtual=%s reason=in use by another app",
                            app_id,
                            virtual,
                        )
                    else:
                        log.warning(
                            "adopt refused app=%s virtual=%s reason=%s", app_id, virtual, exc
                        )
            # What a peer showed us of it while it was away, and it did not
            # hand back, is withdrawn now (see Node.merge_remote).
            written += self.node.end_hold(app_id, now=time.time())
            # Out to every member and every supervisor here before the app
            # runs: servers name it from its first connection (see changed).
            await self.changed(written, wait_s=PUSH_FLUSH_S if app.block else 0.0)
            # In the lease file before the app runs: a daemon killed from
            # here on leaves the next one holding the app's block.
            await self._save_leases()
            # The table in frames: the reply, then `more` records in pushes,
            # which the supervisor waits for before it adopts the table.
            first, *rest = _framed([record_to_wire(r) for r in self.node.table.records()])
            await conn.reply(
                request,
                node=self.config.node.name,
                real_host=str(self.config.node.real_host),
                virtual_range=str(self.config.node.virtual_range),
                spill=[spill.lo, spill.hi] if (spill := self.config.node.spill_ports) else None,
                vip=str(app.vip),
                block=list(app.block) if app.block else None,
                more_blocks=[list(b) for b in app.more_blocks],
                records=first,
                more=sum(len(chunk) for chunk in rest),
                settling=self.settling(),
            )
            for chunk in rest:
                await conn.send({"push": "records", "records": chunk})
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.changed(self.node.detach(app_id, now=time.time()))
            raise
        self.sessions[app_id] = conn
        log.info("app attached app=%s vip=%s pid=%s argv=%s", app_id, app.vip, app.pid, app.argv)
        if app.block is None:
            log.warning(
                "no client port block left for app=%s: servers will see this node's address "
                "for its connections; raise --client-ports or lower --client-block",
                app_id,
            )
        return app_id

    async def _session_op(
        self, conn: Connection, app_id: str, op: str, request: Mapping[str, Any]
    ) -> None:
        if op == "more-ports":
            # The app has used up its client port block: another, out to
            # every member and applied by every supervisor here before the
            # reply (see changed), so that servers name its connections from
            # the new block as soon as it uses it.
            block, written = self.node.more_ports(app_id)
            await self.changed(written, wait_s=PUSH_FLUSH_S, asker=conn)
            if block is not None:
                await self._save_leases()  # before the app uses it, as at attach
            await conn.reply(request, block=list(block) if block else None)
            return
        virtual = VirtualAddress(
            ip=ip_address(str(request["vip"])), port=port_from_wire(request["vport"])
        )
        if op == "claim":
            # A real port may be asked for only from the app's own client
            # blocks (see Binder._bind_in_block); otherwise the pool gives one.
            wanted = request.get("real_port")
            blocks = self.node.apps[app_id].blocks if app_id in self.node.apps else []
            real_port = None
            if wanted is not None:
                port = port_from_wire(wanted)
                real_port = port if any(lo <= port <= hi for lo, hi in blocks) else None
            host = self.config.node.real_host
            claim = self.node.claim(
                app_id,
                virtual,
                avoid=[port_from_wire(p) for p in request.get("avoid") or []],
                real_port=real_port,
                taken=lambda port: port_taken(host, port),
            )
            await conn.reply(request, real_port=claim.real_port, vport=claim.virtual.port)
        else:
            # The push before the reply: the supervisor has the record in its
            # table before the app's listen() returns, so that the app's next
            # connect to it is decided by the new table (and a release, from
            # a sweep or a rebind, is seen as soon as it is answered).
            if op == "listen":
                written = self.node.listen(app_id, virtual)
            else:
                written = self.node.release(app_id, virtual, now=time.time())
            await self.changed(written)
            await conn.reply(request)

    async def _command(self, conn: Connection, op: str, request: Mapping[str, Any]) -> None:
        table = self.node.table
        if op == "status":
            await conn.reply(
                request,
                node=self.config.node.name,
                version=__version__,
                real_host=str(self.config.node.real_host),
                pid=os.getpid(),
                uptime=time.monotonic() - self.started,
                apps=len(self.node.apps),
                services=len(table.live_services()),
                gossip=self.cluster.stats() if self.cluster is not None else None,
            )
        elif op == "services":
            await conn.reply_listing(
                request, "services", [service_view(r) for r in table.live_services()]
            )
        elif op == "apps":
            local = self.node.apps
            served: dict[str, list[ServiceRecord]] = {}
            for service in table.live_services():
                served.setdefault(service.app_id, []).append(service)
            # An app's further client port blocks have records of their own:
            # shown with the app.
            own: list[AppRecord] = []
            more: dict[str, list[tuple[int, AppRecord]]] = {}
            for record in table.live_apps():
                alias = alias_owner(record.app_id)
                if alias is None:
                    own.append(record)
                else:
                    more.setdefault(alias[0], []).append((alias[1], record))
            await conn.reply_listing(
                request,
                "apps",
                [
                    app_view(
                        a,
                        local.get(a.app_id),
                        served.get(a.app_id, []),
                        [r for _, r in sorted(more.get(a.app_id, []), key=lambda m: m[0])],
                    )
                    for a in own
                ],
            )
        elif op == "members":
            members = self.cluster.members() if self.cluster is not None else [self._self_member()]
            await conn.reply_listing(request, "members", members)
        elif op in ("join", "leave"):
            cluster = self.cluster
            if cluster is None:
                raise ClaimError(errno.ENOTCONN, NO_GOSSIP)
            if op == "join":
                seeds = request.get("seeds")
                if not (
                    isinstance(seeds, list)
                    and 0 < len(seeds) <= MAX_SEEDS
                    and all(isinstance(s, str) and 0 < len(s) <= MAX_SEED_CHARS for s in seeds)
                ):
                    raise ClaimError(
                        errno.EINVAL, f"seeds must be a list of 1 to {MAX_SEEDS} HOST[:PORT]"
                    )
                joined = await cluster.join(seeds)
                await conn.reply(
                    request,
                    joined=joined,
                    conflicts=cluster.name_conflicts(),
                    unresolved=cluster.unresolved_seeds(),
                    itself=cluster.self_seeds(),
                )
            else:
                await cluster.leave()
                await conn.reply(request)
        elif op == "records":
            await conn.reply_listing(
                request, "records", [record_to_wire(r) for r in table.records()]
            )
        elif op == "stop":
            await conn.reply(request)
            with trio.move_on_after(1.0):
                await conn.flush()  # the answer goes out before everything stops
            self._stop.set()
        else:
            raise ClaimError(errno.EINVAL, f"unknown operation {op!r:.80}")

    def _self_member(self) -> dict[str, Any]:
        return {
            "name": self.config.node.name,
            "address": str(self.config.node.real_host),
            "gossip": None,  # this daemon does not gossip (as in status)
            "status": "alive",
            "labels": {},
            "incarnation": None,  # the keys are a gossiping member's (members --json)
        }

    def merge_remote(self, records: Sequence[Record]) -> Merged:
        """Merge records from the cluster; see :meth:`Node.merge_remote`."""
        return self.node.merge_remote(records, now=time.time())

    # -- lifecycle ------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        prepare_runtime_dir(self.config.runtime_dir)
        self._dirlock = lock = DirLock.acquire(self.config.runtime_dir)
        try:
            await self._run_locked(lock, task_status)
        finally:
            lock.release()

    async def _run_locked(self, lock: DirLock, task_status: Any) -> None:
        path = control_path(self.config.runtime_dir)
        if held := _leasefile.load(self._lease_path):
            # Apps of a previous daemon, about to re-attach: what they hold
            # goes to no newcomer meanwhile (see axnet._leases).
            self.node.reserve(held)
            log.info(
                "holding for apps of the previous daemon until they re-attach apps=%s",
                ",".join(lease.app_id for lease in held),
            )
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(serve_control, path, self.handle, still_ours=lock.still_ours)
            )
            nursery.start_soon(self._write_leases)
            nursery.start_soon(self._expire_tombstones)
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self._announce_settled)
            log.info(
                "daemon ready node=%s real_host=%s control=%s",
                self.config.node.name,
                self.config.node.real_host,
                path,
            )
            if self.config.announce:
                say(f"axnet daemon: ready: {self._ready_line(path)}")
            task_status.started()
            await self._stop.wait()
            # Written before the sessions close: the apps run on, and the
            # next daemon holds what they hold until they re-attach.
            await self._save_leases()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        self._stop.set()

    def settling(self) -> float:
        """Seconds more the table may lack live records (see SETTLE_S)."""
        elapsed = time.monotonic() - self.started
        joining = self.cluster is not None and self.cluster.joining()
        return max(0.0, (JOIN_SETTLE_MAX_S if joining else SETTLE_S) - elapsed)

    async def _announce_settled(self) -> None:
        """Tell every supervisor once the table is whole: SETTLE_S after the
        start, or once the start-up join is over, whichever is later (at most
        JOIN_SETTLE_MAX_S after the start).  Those that re-attached meanwhile
        drop then what they kept (see Supervisor._apply_attach)."""
        await trio.sleep(max(0.0, SETTLE_S - (time.monotonic() - self.started)))
        cluster = self.cluster
        if cluster is not None and cluster.joining():
            with trio.move_on_after(
                max(0.0, JOIN_SETTLE_MAX_S - (time.monotonic() - self.started))
            ):
                await cluster.wait_joined()
        log.info("settled sessions=%d", len(self.sessions))
        gone, withdrawn = self.node.end_reservations(now=time.time())
        if gone:
            log.info("no longer holding for apps that did not re-attach apps=%s", ",".join(gone))
            self._leases_changed.set()
        await self.changed(withdrawn)
        for conn in list(self.sessions.values()):
            await conn.send({"push": "settled"})

    async def _write_leases(self) -> None:
        """Keep the lease file up to date, a write per burst of changes."""
        while True:
            with trio.move_on_after(math.inf if self._lease_error is None else LEASE_RETRY_S):
                await self._leases_changed.wait()
            self._leases_changed = trio.Event()
            took = await self._save_leases()
            gap = max(LEASE_WRITE_GAP_S, LEASE_WRITE_GAP_FACTOR * took)
            await trio.sleep(min(gap, LEASE_WRITE_GAP_MAX_S))

    async def _save_leases(self) -> float:
        """Write what the apps hold now, in a thread (a slow disk must not
        hold up the control API); say so once when writes start failing,
        and once when they work again.  Returns how long the write took."""
        path, leases = self._lease_path, self.node.leases()
        if self._dirlock is not None and not self._dirlock.still_ours():
            if not self._dir_lost:  # once
                log.warning(
                    "runtime directory %s was removed or replaced while this daemon ran: "
                    "its files there are another daemon's now, left alone (this daemon "
                    "serves its apps on, but no command reaches it; stop it with a signal)",
                    self.config.runtime_dir,
                )
                self._dir_lost = True
            return 0.0
        async with self._lease_lock:
            began = trio.current_time()
            error = await trio.to_thread.run_sync(_leasefile.save, path, leases)
            took = trio.current_time() - began
        if error is not None and self._lease_error is None:
            log.warning(
                "leases not written path=%s reason=%s: a daemon restarted meanwhile "
                "cannot hold what apps hold for them",
                path,
                error,
            )
        elif error is None and self._lease_error is not None:
            log.info("leases written again path=%s", path)
        self._lease_error = None if error is None else str(error)
        return took

    async def _expire_tombstones(self) -> None:
        while True:
            await trio.sleep(TOMBSTONE_SWEEP_S)
            self.node.table.expire(time.time())

    async def _watch_signals(self) -> None:
        """Stop cleanly on SIGINT, SIGTERM and SIGHUP (the terminal of an
        `axnet daemon &` closed): the socket removed, the leases written,
        the cluster left.  A SIGHUP ignored at the start (nohup) stays so."""
        stopping = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            stopping.append(signal.SIGHUP)
        with trio.open_signal_receiver(*stopping) as signals:
            async for signum in signals:
                log.info("daemon stopping signal=%s", signal.Signals(signum).name)
                self._stop.set()
                return


def _describe(record: Record) -> str:
    state = "withdrawn" if record.deleted else "published"
    if isinstance(record, ServiceRecord):
        return f"service={record.virtual} real={record.real} node={record.node} {state}"
    return f"app={record.app_id} vip={record.vip} node={record.node} {state}"


_Item = TypeVar("_Item")


def default_node_name() -> str:
    return os.uname().nodename or "axnet-node"


def _framed(items: list[_Item]) -> list[list[_Item]]:
    """*items* in runs that each fit one control frame (at least one run)."""
    runs = [items[i : i + RECORDS_PER_FRAME] for i in range(0, len(items), RECORDS_PER_FRAME)]
    return runs or [[]]
