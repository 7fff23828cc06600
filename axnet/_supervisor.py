"""``axnet run``: launch an app under the filter and stay as its supervisor.

Theory of operation
-------------------
Three things run in this process:

* the **engine** thread (``axnet.intercept._engine``) answers the app's trapped
  socket calls from a local copy of the service table;
* the **session** with the daemon (trio, main thread): it attaches the app,
  applies the table changes the daemon pushes, and carries the engine's claims
  (``bind``) and publications (``listen``).  When the daemon goes away the
  engine keeps deciding from its last copy, binds fall back to kernel-chosen
  ports, and the session re-attaches with backoff, handing over every binding
  so the new daemon republishes them;
* the **reaper**: the supervisor is a child subreaper, so everything the app
  forks stays ours; when the app's main process exits, the rest of its tree
  gets SIGTERM, then SIGKILL, and the supervisor exits with the app's status.

The app is forked before trio or any thread starts (``launch`` forks).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from ._control import (
    ControlClient,
    ControlError,
    DaemonUnavailable,
    control_path,
    open_session,
    receive_messages,
)
from ._fdlimit import raise_fd_limit
from ._heap import Settler, freeze_startup
from ._node import ClaimError, PortRange
from ._sigfd import SI_KERNEL, open_signalfd, read_signals
from ._table import (
    TOMBSTONE_SWEEP_S,
    AppRecord,
    IPAddress,
    Labels,
    ServiceRecord,
    ServiceTable,
    VirtualAddress,
    ip_address,
)
from ._verdict import Identity
from ._wire import FrameDecoder, WireError, frame, int_from_wire, record_from_wire, visible
from .intercept._bpf import build_filter
from .intercept._engine import Engine
from .intercept._launcher import LaunchError, launch

log = logging.getLogger("axnet.run")

PR_SET_CHILD_SUBREAPER = 36
#: Seconds the rest of the app's tree gets between SIGTERM and SIGKILL.
TERMINATE_GRACE_S = 2.0
#: Seconds what the app left running gets to end by itself, before it is
#: taken for a server that daemonized and gets SIGTERM.
LEFT_BEHIND_GRACE_S = 0.3
#: Seconds a bind waits for the daemon before falling back to a kernel port.
CLAIM_TIMEOUT_S = 2.0
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0
#: The longest a daemon's ``settling`` is taken for (it says 5 s, or up to
#: 60 s while its start-up join is under way, then pushes "settled").
SETTLE_MAX_S = 60.0


@attrs.frozen(kw_only=True)
class RunOptions:
    argv: tuple[str, ...]
    vip: IPAddress | None
    name: str
    labels: Labels
    runtime_dir: Path
    env: Mapping[str, str] | None = None
    #: ``axnet run --busy-poll``: µs the engine polls after an accept parks,
    #: and after each answer for the app's next call.
    busy_poll_us: int = 0


class EngineFailed(Exception):
    """The supervisor's engine thread died; the app was stopped with it."""


class ShuttingDown(ControlError):
    """The app has exited: its supervisor asks the daemon nothing more."""


class Session:
    """The supervisor's side of its control session (request/reply plus pushes)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._next_id = 0
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._send_lock = trio.Lock()
        self.closed = trio.Event()

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self._next_id += 1
        ident = self._next_id
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[ident] = send
        try:
            async with self._send_lock:
                await self.stream.send_all(frame({"op": op, "id": ident, **fields}))
            with trio.fail_after(CLAIM_TIMEOUT_S * 5):
                reply = await receive.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
            raise DaemonUnavailable("the daemon went away") from None
        except trio.TooSlowError:
            raise ControlError(f"the daemon did not answer '{op}' in time") from None
        finally:
            self._waiting.pop(ident, None)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")), err=int(reply.get("errno") or 0))
        return reply

    async def handshake(
        self, op: str, fields: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send the first request and read until its reply, before :meth:`read` runs.

        Returns the reply and the pushes that followed it in the same reads:
        they are newer than the reply's snapshot and must be applied after it.
        Pushes before the reply are older than the snapshot and are dropped.
        A reply that says ``more`` records follow (a table larger than one
        frame) is returned once that many have come in pushes.
        """
        self._next_id += 1
        ident = self._next_id
        reply: dict[str, Any] | None = None
        later: list[dict[str, Any]] = []

        def complete() -> bool:
            if reply is None:
                return False
            pushed = sum(len(p.get("records") or []) for p in later)
            return pushed >= int_from_wire(reply.get("more") or 0)

        try:
            await self.stream.send_all(frame({"op": op, "id": ident, **fields}))
            while not complete():
                data = await self.stream.receive_some(65536)
                got = self._take_handshake(op, ident, data, later, replied=reply is not None)
                reply = got or reply
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise DaemonUnavailable(f"the daemon closed the session during '{op}'") from None
        assert reply is not None
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")), err=int(reply.get("errno") or 0))
        return reply, later

    def _take_handshake(
        self, op: str, ident: int, data: bytes, later: list[dict[str, Any]], *, replied: bool
    ) -> dict[str, Any] | None:
        """Feed one read of the handshake; the reply if it is in this read."""
        reply: dict[str, Any] | None = None
        if not data:
            raise DaemonUnavailable(f"the daemon closed the session during '{op}'")
        # Pushes that follow the reply (in this read or a later one) are kept.
        for message in self._decoder.feed(data):
            if not isinstance(message, dict):
                continue
            if "push" in message:
                if replied or reply is not None:
                    later.append(message)
            elif message.get("id") == ident:
                reply = message
        return reply

    async def answer(self, ping: Mapping[str, Any]) -> None:
        """Tell the daemon that the pushes before *ping* are applied (they
        are, in order, by the time it is read)."""
        try:
            async with self._send_lock:
                await self.stream.send_all(frame({"op": "applied", "seq": ping.get("seq")}))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the session is ending: read() sees it

    async def read(self, on_push: Any) -> None:
        """Dispatch replies and pushes until the daemon closes the session."""
        try:
            async for message in receive_messages(self.stream, self._decoder):
                if message.get("push") == "ping":
                    await self.answer(message)
                elif "push" in message:
                    on_push(message)
                elif (channel := self._waiting.get(message.get("id", -1))) is not None:
                    channel.send_nowait(message)
        except WireError as exc:
            log.warning("session closed reason=%s", exc)
        finally:
            self.closed.set()
            for channel in self._waiting.values():
                channel.close()


class Supervisor:
    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.app_id = uuid.uuid4().hex[:12]
        self.table = ServiceTable()
        self.session: Session | None = None
        self.engine: Engine | None = None
        self.identity: Identity | None = None
        #: Records kept from before a re-attach to a daemon still settling, by
        #: key, until it has settled or pushes that key (see _apply_attach);
        #: for how many seconds more; and which attach kept them.
        self.carried: dict[object, AppRecord | ServiceRecord] = {}
        self.carried_for = 0.0
        self._attaches = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self.engine_failed = False
        self._heap = Settler()

    # -- NodeLink, called from the engine thread --------------------------------

    def claim(
        self, virtual: VirtualAddress, avoid: Sequence[int], real_port: int = 0
    ) -> tuple[int, int]:
        fields: dict[str, Any] = {"vip": str(virtual.ip), "vport": virtual.port}
        fields["avoid"] = list(avoid)
        if real_port:
            fields["real_port"] = real_port
        try:
            reply = self._from_engine("claim", **fields)
        except ControlError as exc:
            if exc.errno:
                raise ClaimError(exc.errno, str(exc)) from None
            # No daemon: the real port asked for, or the kernel's pick; check
            # conflicts locally.
            if virtual.port and self._locally_in_use(virtual):
                raise ClaimError(errno.EADDRINUSE, f"{virtual} is already in use") from None
            if not isinstance(exc, ShuttingDown):  # else the app is on its way out
                log.warning("bind without daemon virtual=%s: published later", virtual)
            return real_port, virtual.port
        return int(reply["real_port"]), int(reply["vport"])

    def listen(self, virtual: VirtualAddress) -> None:
        try:
            self._from_engine("listen", vip=str(virtual.ip), vport=virtual.port)
        except ControlError as exc:
            log.warning("listen not published yet virtual=%s reason=%s", virtual, exc)

    def release(self, virtual: VirtualAddress) -> None:
        try:
            self._from_engine("release", vip=str(virtual.ip), vport=virtual.port)
        except ControlError:
            pass  # a new daemon will not hear of it: the binding is gone from our list

    def more_ports(self) -> tuple[int, int] | None:
        """Another client port block, the app's from now on; None if the
        daemon has none to give (or is older, or away)."""

        adopted: list[tuple[int, int]] = []

        def adopt(reply: Mapping[str, Any]) -> None:
            # In the trio thread, as an attach replaces the identity: a
            # re-attach meanwhile cannot be overwritten with the old session's.
            block = reply.get("block")
            if block and self.identity is not None:
                adopted.append((int(block[0]), int(block[1])))
                self.identity = attrs.evolve(
                    self.identity, block=adopted[0], blocks=(*self.identity.blocks, adopted[0])
                )
                if self.engine is not None:
                    self.engine.identity = self.identity

        try:
            self._from_engine("more-ports", then=adopt)
        except ControlError:
            return None
        return adopted[0] if adopted else None

    def use_block(self, block: tuple[int, int]) -> None:
        """Make *block*, one the app holds, the one its connects use from now on."""

        def adopt() -> None:
            # In the trio thread, as more_ports adopts, and only to a block
            # the app still holds: one re-attached meanwhile holds one block.
            if self.identity is not None and block in self.identity.blocks:
                self.identity = attrs.evolve(self.identity, block=block)
                if self.engine is not None:
                    self.engine.identity = self.identity

        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(adopt, trio_token=token)

    def _locally_in_use(self, virtual: VirtualAddress) -> bool:
        if self.table.resolve(virtual.ip, virtual.port) is not None:
            return True
        engine = self.engine
        return engine is not None and any(b.virtual == virtual for b in engine.snapshot_bindings())

    def _from_engine(
        self, op: str, then: Callable[[Mapping[str, Any]], None] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Ask the daemon from the engine thread; *then* sees the reply first,
        in the trio thread."""
        token = self._token
        if token is None:
            raise ShuttingDown("supervisor is shutting down")

        async def call() -> dict[str, Any]:
            session = self.session
            if session is None or session.closed.is_set():
                raise DaemonUnavailable("no daemon session")
            try:
                with trio.fail_after(CLAIM_TIMEOUT_S):
                    reply = await session.request(op, **fields)
                if then is not None and session is self.session:
                    then(reply)
                return reply
            except trio.TooSlowError:
                # The daemon may still act on it (claim a real port the app
                # never binds): end the session instead, so that it withdraws
                # this app's records and the re-attach carries what the app
                # has really bound.
                with contextlib.suppress(OSError):
                    session.stream.socket.shutdown(socket.SHUT_RDWR)
                raise

        try:
            return trio.from_thread.run(call, trio_token=token)
        except trio.TooSlowError:
            raise ControlError(f"the daemon did not answer '{op}' in time") from None
        except trio.RunFinishedError:
            raise ShuttingDown("supervisor is shutting down") from None

    # -- session ------------------------------------------------------------------

    def _on_push(self, message: Mapping[str, Any]) -> None:
        if message.get("push") == "settled":
            self._drop_carried()  # the daemon's table is whole now
            return
        if message.get("push") != "records":
            return
        items = message.get("records") or []
        for item in items:
            try:
                record = record_from_wire(item)
            except WireError as exc:
                log.warning("dropped malformed record reason=%s", exc)
                continue
            self.carried.pop(record.key, None)  # the daemon has it: ours is no longer carried
            self.table.merge(record)
        self._heap.merged(len(items), len(self.table))

    async def expire_tombstones(self) -> None:
        """Forget withdrawn records as the daemon does, TOMBSTONE_TTL after
        their withdrawal: this table mirrors the daemon's, which forgets
        them at the same age.  A long-lived app kept one for every app and
        service that ever ran in the cluster (1 kB each)."""
        while True:
            await trio.sleep(TOMBSTONE_SWEEP_S)
            self.table.expire(time.time())

    async def _attach(self) -> tuple[Session, dict[str, Any]]:
        """Attach a new session and adopt its table (the reply, then later pushes)."""
        stream = await open_session(control_path(self.options.runtime_dir))
        session = Session(stream)
        bindings = self.engine.snapshot_bindings() if self.engine is not None else []
        claims = [[str(b.virtual.ip), b.virtual.port, b.real_port, b.listening] for b in bindings]
        identity = self.identity
        fields: dict[str, Any] = {
            "app_id": self.app_id,
            "vip": str(identity.vip)
            if identity
            else (str(self.options.vip) if self.options.vip else None),
            "block": list(identity.block) if identity and identity.block else None,
            # Its other blocks, for a daemon that restarted: connections
            # from them are open still, and must keep being named as ours.
            "more_blocks": [list(b) for b in identity.blocks if b != identity.block]
            if identity
            else [],
            "name": self.options.name,
            "labels": [list(x) for x in self.options.labels],
            "pid": self._pid,
            # Shown in listings only: as text that travels (any bytes may
            # make up a command line, control characters included).
            "argv": [visible(arg) for arg in self.options.argv],
            "claims": claims,
            # Where each is bound, beside them (a daemon of the previous
            # version takes claims of four fields only): a daemon at another
            # address than the one that had them publishes where they are.
            "claim_hosts": [str(b.host) for b in bindings],
        }
        try:
            with trio.fail_after(CLAIM_TIMEOUT_S * 5):
                reply, later = await session.handshake("attach", fields)
            self._apply_attach(reply, later)
            for push in later:
                if push.get("push") == "ping":
                    await session.answer(push)
        except BaseException as exc:
            stream.socket.close()
            if isinstance(exc, trio.TooSlowError):
                raise ControlError("the daemon did not answer 'attach' in time") from None
            if isinstance(exc, (KeyError, ValueError, TypeError)):
                raise ControlError(f"the daemon's attach reply is malformed ({exc!r})") from None
            raise
        return session, reply

    async def _keep_session(self, session: Session) -> None:
        """Run the session; when it ends, re-attach with backoff, forever."""
        async with trio.open_nursery() as nursery:
            await self._keep_attached(session, nursery)

    async def _keep_attached(self, session: Session, nursery: trio.Nursery) -> None:
        delay = RECONNECT_MIN_S
        while True:
            await session.read(self._on_push)
            self.session = None
            log.warning("daemon session lost; apps keep their last table; re-attaching")
            refused = ""
            while True:
                await trio.sleep(delay)
                try:
                    session, reply = await self._attach()
                except (ControlError, OSError) as exc:
                    # No daemon yet is the usual reason, and passes; a daemon
                    # that refuses the app is worth saying (once a reason).
                    gone = isinstance(exc, DaemonUnavailable) and exc.nobody_listens
                    if (
                        isinstance(exc, ControlError)
                        and exc.errno
                        and not gone
                        and str(exc) != refused
                    ):
                        refused = str(exc)
                        log.warning("re-attach refused reason=%s; trying again", exc)
                    else:
                        log.debug("re-attach failed reason=%s", exc)
                    delay = min(delay * 2, RECONNECT_MAX_S)
                    continue
                except Exception:  # never let the app lose its supervisor over it
                    log.exception("re-attach failed")
                    delay = min(delay * 2, RECONNECT_MAX_S)
                    continue
                self.session = session
                delay = RECONNECT_MIN_S
                log.warning("re-attached to the daemon vip=%s", reply.get("vip"))
                if self.carried:
                    nursery.start_soon(self.forget_carried, self._attaches, self.carried_for)
                break

    async def forget_carried(self, attach: int, after: float) -> None:
        """Once the daemon has settled, drop what was carried over and that it
        has not pushed since (an app that died while there was no daemon)."""
        await trio.sleep(after)
        if attach != self._attaches:
            return  # attached again meanwhile: that attach's own task decides
        self._drop_carried()

    def _drop_carried(self) -> None:
        gone = sum(self.table.forget(record) for record in self.carried.values())
        self.carried = {}
        if gone:
            log.info("records the new daemon never had dropped count=%d", gone)

    def _apply_attach(self, reply: Mapping[str, Any], later: Sequence[Mapping[str, Any]]) -> None:
        """Adopt the attach reply's table, with the pushes after it (the rest
        of a table larger than a frame, and newer changes), whole: the engine
        never decides from half a table."""
        fresh = ServiceTable()
        # Names of services and apps withdrawn before, which this app's
        # connections to them and from them still go by: a table built anew
        # would not know them.
        fresh.keep_retired(self.table)
        items = [*(reply.get("records") or [])]
        for push in later:
            if push.get("push") == "records":
                items += push.get("records") or []
        for item in items:
            try:
                fresh.merge(record_from_wire(item))
            except WireError as exc:
                log.warning("dropped malformed record reason=%s", exc)
        # A daemon that has just started may not have every live record yet
        # (supervisors re-attach one by one): keep what we knew and it lacks.
        settling = reply.get("settling")
        self._attaches += 1
        self.carried, self.carried_for = {}, 0.0
        if isinstance(settling, float | int) and 0 < settling <= SETTLE_MAX_S:
            kept = [r for r in self.table.records() if not r.deleted and fresh.current(r) is None]
            fresh.merge_all(kept)
            self.carried = {r.key: r for r in kept}
            self.carried_for = float(settling)
        block = reply.get("block")
        current = (int(block[0]), int(block[1])) if block else None
        more = [(int(b[0]), int(b[1])) for b in reply.get("more_blocks") or []]
        self.identity = Identity(
            vip=ip_address(str(reply["vip"])),
            real_host=ip_address(str(reply["real_host"])),
            block=current,
            blocks=(*([current] if current else []), *more),
            virtual_range=_virtual_range(reply.get("virtual_range")),
            spill=_spill(reply.get("spill")),
        )
        # Swap whole objects: the engine thread reads these attributes.
        self.table = fresh
        if self.engine is not None:
            self.engine.table = fresh
            self.engine.identity = self.identity
        self._heap.merged(len(fresh), len(fresh))

    # -- main ---------------------------------------------------------------------

    async def main(self, launched_pid: int, launched_pidfd: int, engine_factory: Any) -> int:
        """Supervise the launched app until it exits; its exit status (minus
        the signal that ended it, if one did).

        Whatever ends this early (no daemon, a bug) takes the app's whole tree
        down with it: without its supervisor every trapped call would fail.
        """
        try:
            return await self._supervise(launched_pid, launched_pidfd, engine_factory)
        except BaseException:
            _kill_tree(launched_pidfd)
            raise

    async def _supervise(self, launched_pid: int, launched_pidfd: int, engine_factory: Any) -> int:
        self._token = trio.lowlevel.current_trio_token()
        self._pid = launched_pid
        try:
            session, _ = await self._attach()
        except (ControlError, OSError) as exc:
            raise ControlError(str(exc)) from None
        self.session = session
        assert self.identity is not None
        self.engine = engine_factory(self.identity, self.table, self)
        thread = threading.Thread(
            target=self._serve_engine, args=(launched_pidfd,), name="axnet-engine", daemon=True
        )
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": the app is stopped with us
            raise LaunchError(
                f"axnet run: cannot start the supervisor's thread ({exc}): the user's limit "
                "on processes (ulimit -u) or on memory (ulimit -v) is reached; raise it "
                "and run it again"
            ) from None
        log.info(
            "app started pid=%s vip=%s client_ports=%s",
            launched_pid,
            self.identity.vip,
            self.identity.block,
        )
        status = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_session, session)
            nursery.start_soon(self.expire_tombstones)
            await nursery.start(self._forward_signals, launched_pid)
            await trio.lowlevel.wait_readable(launched_pidfd)
            status = _reap(launched_pid)
            nursery.cancel_scope.cancel()
        self._token = None
        # A pre-fork server's workers may outlive their master a moment.
        with trio.move_on_after(LEFT_BEHIND_GRACE_S):
            while _reap_exited() and _children():
                await trio.sleep(0.02)
        if left := _children():
            # A server that daemonizes (pg_ctl start, nginx without "daemon
            # off;") looks to us like an app that exited: say why it goes.
            log.warning(
                "the app exited and left processes running pids=%s: they get SIGTERM now "
                "(run a server that daemonizes in the foreground under axnet run)",
                ",".join(map(str, left)),
            )
        # The rest of the tree gets its grace period; a second Ctrl-C meanwhile
        # must not cut the clean-up short (the signals stay blocked: ignored).
        try:
            await trio.to_thread.run_sync(_terminate_tree, abandon_on_cancel=True)
        except RuntimeError:  # no thread to be had (ulimit -u, -v): wait here instead
            _terminate_tree()
        assert self.engine is not None
        self.engine.stop()
        thread.join(timeout=10.0)  # it stops at once; only a wedged engine is left behind
        if self.engine_failed:
            raise EngineFailed(
                "the interception engine failed (see the log above); the app was stopped"
            )
        return status

    def _serve_engine(self, app_pidfd: int) -> None:
        assert self.engine is not None
        try:
            self.engine.serve()
        except Exception:
            # Nobody answers the app's trapped calls now: every one of them
            # would hang.  Stop it rather than leave it so.
            log.exception("engine stopped")
            self.engine_failed = True
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(app_pidfd, signal.SIGKILL)

    async def _forward_signals(
        self, pid: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Pass the signals of `_FORWARDED` on to the app, those that came while the
        supervisor attached included; not a terminal's, which the app got too.

        SIGCHLD: reap the orphans that came to us (we are the app's
        subreaper, as init is of everything else) as they exit, not when the
        app does: a daemonizing server's old processes (nginx's binary
        upgrade, a double fork) would stay zombies meanwhile.
        """
        fd = open_signalfd(_FORWARDED | {signal.SIGCHLD})
        try:
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(fd)
                for signum, code in read_signals(fd):
                    if signum == signal.SIGCHLD:
                        _reap_orphans(pid)
                        continue
                    if code == SI_KERNEL and (
                        signum not in _FROM_TERMINAL or _kernel_sent_it_too(pid, signum)
                    ):
                        continue
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        return
        finally:
            os.close(fd)

    _pid: int = 0


def _spill(value: object) -> tuple[int, int] | None:
    """The node's spill ports from an attach reply (see Identity.spill)."""
    if value is None:
        return None  # an older daemon: connects past the blocks take any port
    try:
        if isinstance(value, list) and len(value) == 2 and all(type(p) is int for p in value):
            ports = PortRange(lo=value[0], hi=value[1])
            return ports.lo, ports.hi
    except ValueError:
        pass
    log.warning("ignored malformed spill ports from the daemon: %r", value)
    return None


def _virtual_range(text: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The node's virtual range from an attach reply: a connect into it that
    the table does not know is refused, never routed to a real network."""
    if text is None:
        return None  # a daemon that does not say (older): the table alone decides
    try:
        return ipaddress.ip_network(str(text))
    except ValueError:
        log.warning("ignored a malformed virtual range from the daemon: %r", text)
        return None


def _reap(pid: int) -> int:
    """The app's exit status; minus the signal that ended it, if one did."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return 0
    return os.waitstatus_to_exitcode(status)


def _children() -> list[int]:
    pids: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def _reap_orphans(app: int) -> None:
    """Reap our children that exited, the app excepted (its status is _reap's)."""
    for child in _children():
        if child != app:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, os.WNOHANG)


def _reap_exited() -> bool:
    """Reap every child that has exited (our children: their pids are not
    reused meanwhile); whether any child is left."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        return False
    return True


def _terminate_tree() -> None:
    """SIGTERM what is left of the app's tree (we are its subreaper), then SIGKILL.

    Orphans keep arriving (reparented to us) while their parents die, so every
    round signals whoever is a child now: SIGTERM once within the grace
    period, SIGKILL after it.  Returns once no child is left.
    """
    import time

    deadline = time.monotonic() + TERMINATE_GRACE_S
    termed: set[int] = set()
    while _reap_exited():
        late = time.monotonic() > deadline
        for child in _children():
            if late or child not in termed:
                termed.add(child)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL if late else signal.SIGTERM)
        time.sleep(0.02)


def _kill_tree(pidfd: int) -> None:
    """SIGKILL the app (by pidfd: its pid may be reaped and reused) and end its tree."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    _terminate_tree()


#: Signals the supervisor passes on to the app: every one a user or a
#: service manager sends a server to tell it something, whose default would
#: otherwise end the supervisor (and the app with it) or be lost: stop
#: (INT, TERM, QUIT), reload and reopen the logs (HUP, USR1, USR2: systemd's
#: ``kill -USR1 $MAINPID``), stop the workers gracefully (WINCH: nginx,
#: Apache), and the timers' and the power supply's (ALRM, VTALRM, PROF,
#: PWR).  Not the job-control stops: the supervisor stops with its app.
_FORWARDED = frozenset(
    {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
        signal.SIGALRM,
        signal.SIGVTALRM,
        signal.SIGPROF,
        signal.SIGPWR,
    }
)

#: Those of them the kernel sends that are the app's too: a terminal's
#: Ctrl-C and Ctrl-\, a hang-up.  The kernel's others are not the app's: a
#: terminal's resize (WINCH) goes to its foreground group alone, which an
#: app that made a session of its own (`httpd -DNO_DETACH`, to which WINCH
#: means "stop gracefully") has left; ALRM, VTALRM and PROF would be the
#: supervisor's own timers.
_FROM_TERMINAL = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGHUP})


def _kernel_sent_it_too(pid: int, signum: int) -> bool:
    """Whether a signal the kernel raised (si_code SI_KERNEL) reached the app
    as well: a terminal's Ctrl-C or Ctrl-\\, or the SIGHUP of a session leader's
    exit, go to the whole foreground group, which the app shares with us
    (forwarding would deliver them twice: a second Ctrl-C means "force quit"
    to many apps).  A hang-up signals the session leader alone: when that is
    us, the app did not get it."""
    try:
        if os.getpgid(pid) != os.getpgrp():
            return False  # the app made a group of its own
        return not (signum == signal.SIGHUP and os.getsid(0) == os.getpid())
    except OSError:
        return False


def _inherited_fds() -> list[int]:
    """This process's open fds beyond stdin, stdout and stderr."""
    listed = [fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2]
    # Less the one the listing read through, closed again by now.
    return [fd for fd in listed if _is_open(fd)]


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def run(options: RunOptions) -> int:
    """Run the app to completion under axnet; returns its exit status, or
    minus the signal that ended it (as `subprocess` reports it)."""
    path = control_path(options.runtime_dir)
    # Fail before starting anything when no daemon answers.
    with ControlClient(path, timeout=5.0) as client:
        client.request("status")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # Blocked for good, and read from a signalfd by the forwarder, which knows
    # who sent each (see _forward_signals): a Ctrl-C while the supervisor
    # attaches waits for it.  Every thread started from here on inherits the
    # block (as a signalfd needs); the app does not.
    app_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED | {signal.SIGCHLD})
    inherited = _inherited_fds()
    launched = launch(options.argv, env=options.env, program=build_filter(), sigmask=app_mask)
    # What `axnet run` was given beyond stdio was for the app (a socket
    # activation's listeners, a pipe whose reader waits for its end): a copy
    # kept here would keep a listener the app closed taking connections.
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    raise_fd_limit()  # after the launch: the app keeps the limits it was given
    supervisor = Supervisor(options)

    def make_engine(identity: Identity, table: ServiceTable, node: Supervisor) -> Engine:
        return Engine(
            launched.notify,
            identity=identity,
            table=table,
            node=node,
            busy_poll_us=options.busy_poll_us,
        )

    try:
        freeze_startup()
        return trio.run(supervisor.main, launched.pid, launched.pidfd, make_engine)
    finally:
        os.close(launched.pidfd)
        launched.notify.close()


__all__ = ["RunOptions", "Supervisor", "errno", "run"]
