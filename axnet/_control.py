"""The control API: a unix socket in the user's runtime directory.

Frames are length-prefixed msgpack maps (see :mod:`axnet._wire`).  A request
is ``{"op": NAME, "id": N, ...}``; its reply is ``{"id": N, "ok": True, ...}``
or ``{"id": N, "ok": False, "error": TEXT, "errno": E}``.  A listing too long
for one frame comes in parts, each but the last with ``"more": True``.  The
daemon may also send ``{"push": KIND, ...}`` frames on a session (table changes).

Only the user who owns the daemon may talk to it: the directory is 0700, the
socket 0600, and the server checks the peer's uid with ``SO_PEERCRED`` in case
the file modes were loosened by hand.  Clients check the server's uid the same
way: in ``/tmp`` another user could have made the directory first.

The daemon never waits on one client to serve another: what it sends a
connection goes through that connection's bounded outbox, written by a task of
its own.  A client that stops reading (an ``axnet run`` stopped with Ctrl-Z)
fills its outbox and is disconnected; a supervisor re-attaches when it runs
again and gets the whole table afresh.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from ._wire import (
    LISTING_PART_BYTES,
    RECORDS_PER_FRAME,
    FrameDecoder,
    WireError,
    frame,
    record_wire_key,
    runs_under,
)

log = logging.getLogger("axnet.daemon")

CONTROL_SOCKET = "control.sock"
_UCRED = struct.Struct("3i")
#: Messages a connection may have waiting to be written before it is dropped,
#: and bytes (a push frame can be megabytes: the count alone bounds nothing).
OUTBOX_MESSAGES = 4096
OUTBOX_BYTES = 64 * 1024 * 1024
#: Messages queued and not yet written past which a session's table pushes
#: are held, the latest record of each key only, until it catches up: a
#: supervisor that stops reading (Ctrl-Z) costs one record per key of the
#: table, not a message per change, and is not dropped for it.
MERGE_PUSHES_AT = 256
#: Characters of an error text sent back: errors quote what the client sent,
#: which may be megabytes (an unknown op, a bad address), and an answer
#: larger than a frame would end the session instead.
MAX_ERROR_CHARS = 1000
#: Why a daemon without gossip refuses join and leave, and what to do.
NO_GOSSIP = (
    "this daemon runs without gossip; restart it with "
    "'axnet daemon --advertise IP' (and --gossip-key-file) to cluster"
)
#: accept() errors that mean "out of resources for now", not "broken".
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ControlError(Exception):
    """The daemon refused a request, or could not be reached."""

    def __init__(self, message: str, *, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class DaemonUnavailable(ControlError):
    """No daemon listens on the control socket."""

    @property
    def nobody_listens(self) -> bool:
        """No daemon at all there (not one that could not be reached)."""
        return self.errno in (errno.ENOENT, errno.ECONNREFUSED)


def runtime_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where this user's daemon keeps its control socket.

    ``--runtime-dir`` wins, then ``$AXNET_RUNTIME_DIR``, then
    ``$XDG_RUNTIME_DIR/axnet``, then ``/tmp/axnet-UID``.
    """
    if explicit:
        return Path(explicit)
    env = os.environ.get("AXNET_RUNTIME_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "axnet"
    return Path(f"/tmp/axnet-{os.getuid()}")


def prepare_runtime_dir(path: Path) -> None:
    """Create *path* as 0700 and refuse one owned by somebody else.

    Ownership is checked on the path itself before any link is followed: in
    /tmp anyone can plant ``/tmp/axnet-UID`` as a link to a directory of
    ours, which we would otherwise make 0700 and put a socket in.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except FileExistsError:  # a file of that name: "File exists" would puzzle
        raise ControlError(
            f"cannot use runtime directory {path}: {os.strerror(errno.ENOTDIR)}; choose "
            "another with --runtime-dir",
            err=errno.ENOTDIR,
        ) from None
    except OSError as exc:
        raise ControlError(
            f"cannot use runtime directory {path}: {exc.strerror}; choose another with "
            "--runtime-dir",
            err=exc.errno or 0,
        ) from None
    if stat.S_ISLNK(info.st_mode) and info.st_uid == os.getuid():
        info = path.stat()  # our own link: what it points to must be ours too
    if info.st_uid != os.getuid():
        raise ControlError(
            f"runtime directory {path} belongs to uid {info.st_uid}, not to you "
            f"(uid {os.getuid()}); choose another with --runtime-dir"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)


def control_path(runtime: Path) -> Path:
    return runtime / CONTROL_SOCKET


def peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


# -- server ------------------------------------------------------------------

Handler = Callable[["Connection", Mapping[str, Any]], Awaitable[None]]


class Connection:
    """One client of the control API, seen from the daemon."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._outbox, self._to_write = trio.open_memory_channel[bytes](OUTBOX_MESSAGES)
        self._queued = self._written = 0
        self._waiting_bytes = 0
        self._caught_up = trio.Event()
        self.closed = False
        #: Pings sent, the newest one the client answered, and an event set at
        #: each answer (see ping).
        self._pings = self._applied = 0
        self._answered = trio.Event()
        self._finished = False
        #: Table pushes held while the client is behind (see MERGE_PUSHES_AT).
        self._held: dict[tuple[object, ...], list[object]] = {}

    async def push_records(self, records: list[list[object]]) -> None:
        """Queue a push of table *records* (wire form); one held back and
        merged with later ones while the client is behind."""
        if self.closed:
            return
        if not self._held and self._queued - self._written < MERGE_PUSHES_AT:
            await self.send({"push": "records", "records": records})
            return
        for wire in records:
            self._held[record_wire_key(wire)] = wire  # newer supersedes older

    def _release_held(self) -> None:
        """Queue the held records, before anything queued after them."""
        held = list(self._held.values())
        self._held.clear()
        for start in range(0, len(held), RECORDS_PER_FRAME):
            self._queue({"push": "records", "records": held[start : start + RECORDS_PER_FRAME]})

    async def send(self, message: Mapping[str, Any]) -> None:
        """Queue *message* for this client; never waits for it to read."""
        if self._held:
            self._release_held()
        self._queue(message)

    def _queue(self, message: Mapping[str, Any]) -> None:
        data = frame(dict(message))  # ValueError when too large: the caller's to answer
        if self.closed:
            return
        try:
            if self._waiting_bytes + len(data) > OUTBOX_BYTES:
                raise trio.WouldBlock
            self._outbox.send_nowait(data)
            self._queued += 1
            self._waiting_bytes += len(data)
        except trio.WouldBlock:
            log.warning("control client not reading: disconnected (a supervisor re-attaches)")
            self._drop()
        except trio.ClosedResourceError:
            pass

    async def write_out(self) -> None:
        """Write queued messages until :meth:`finish`, or until the client is gone."""
        async for data in self._to_write:
            self._waiting_bytes -= len(data)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._drop()
                return
            self._written += 1
            if self._written == self._queued and self._held:
                self._release_held()  # caught up with what came before them
            if self._written == self._queued:
                self._caught_up.set()
                self._caught_up = trio.Event()

    async def flush(self) -> None:
        """Wait until what is queued so far is written (or the client is gone)."""
        while self._written < self._queued and not self.closed:
            await self._caught_up.wait()

    async def ping(self) -> int:
        """Ask the client to say when it has taken everything queued before
        this: a supervisor answers ``applied`` once it has applied the pushes
        before the ping to its table.  Returns the ping's number."""
        self._pings += 1
        await self.send({"push": "ping", "seq": self._pings})
        return self._pings

    @property
    def answers_pings(self) -> bool:
        """Whether the client has answered every ping so far (a stopped
        supervisor stops answering: nobody waits on it until it catches up)."""
        return self._applied == self._pings

    def applied(self, seq: int) -> None:
        """The client answered ping *seq* (and so every one before it)."""
        if self._applied < seq <= self._pings:
            self._applied = seq
            self._answered.set()
            self._answered = trio.Event()

    async def wait_applied(self, seq: int) -> None:
        """Until the client has answered ping *seq*, or is gone."""
        while self._applied < seq and not (self.closed or self._finished):
            await self._answered.wait()

    def finish(self) -> None:
        """No more messages: :meth:`write_out` ends once the queued ones are out."""
        self._finished = True
        self._answered.set()
        self._outbox.close()

    def _drop(self) -> None:
        self.closed = True
        self._caught_up.set()
        self._answered.set()
        self._outbox.close()
        self.stream.socket.close()  # wakes the reader: the session ends

    async def reply(self, request: Mapping[str, Any], **fields: Any) -> None:
        await self.send({"id": request.get("id"), "ok": True, **fields})

    async def fail(self, request: Mapping[str, Any], message: str, err: int = 0) -> None:
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 1] + "…"
        await self.send({"id": request.get("id"), "ok": False, "error": message, "errno": err})

    async def reply_listing(
        self, request: Mapping[str, Any], field: str, items: Sequence[object], **fields: Any
    ) -> None:
        """Reply with a list that may not fit one frame: in parts of at most
        LISTING_PART_BYTES, each but the last marked ``more`` (the client joins
        them).  Each part is written before the next is queued, so a long
        listing never fills the outbox."""
        parts = runs_under(items, LISTING_PART_BYTES)
        for part in parts[:-1]:
            await self.reply(request, **{field: part}, more=True)
            await self.flush()
        await self.reply(request, **{field: parts[-1]}, **fields)

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Yield decoded requests until the peer closes or sends garbage."""
        try:
            async for message in receive_messages(self.stream, self._decoder):
                yield message
        except WireError as exc:
            log.warning("control client sent garbage (%s): disconnected", exc)
            return


async def receive_messages(
    stream: trio.SocketStream, decoder: FrameDecoder
) -> AsyncIterator[dict[str, Any]]:
    """Decoded map messages until the peer closes; WireError on garbage."""
    while True:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not data:
            return
        for message in decoder.feed(data):
            if isinstance(message, dict):
                yield message


async def serve_control(
    path: Path,
    handler: Handler,
    *,
    still_ours: Callable[[], bool] = lambda: True,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept control connections on *path* forever, one task each.

    The socket is removed at the end only if *still_ours()*: a daemon whose
    directory was replaced while it ran leaves the new daemon's socket there.
    """
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            try:
                path.unlink()  # stale socket from a daemon that died
            except OSError as exc:  # a read-only directory, a directory there
                raise ControlError(
                    f"cannot remove {path}, which no daemon listens on ({exc.strerror}); "
                    "remove it by hand or choose another --runtime-dir (or AXNET_RUNTIME_DIR)",
                    err=exc.errno or 0,
                ) from None
        else:
            stop = command_for("axnet stop", path.parent)
            raise ControlError(
                f"a daemon already listens on {path}; stop it with '{stop}' "
                "or choose another --runtime-dir"
            )
        finally:
            probe.close()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await listener.bind(str(path))
    except OSError as exc:
        listener.close()
        raise ControlError(_unusable_socket_path(path, exc), err=exc.errno or 0) from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    # Deep (SOMAXCONN, 4096; the kernel caps it at net.core.somaxconn): on
    # a full queue a client's connect fails at once (EAGAIN), not waits.
    listener.listen(socket.SOMAXCONN)
    task_status.started()
    my_uid = os.getuid()

    async def run_one(sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        try:
            if peer_uid(sock) != my_uid:  # type: ignore[arg-type]  # trio sockets proxy getsockopt
                return
            conn = Connection(stream)
            async with trio.open_nursery() as writer:
                writer.start_soon(conn.write_out)
                try:
                    await handler(conn, {})
                except Exception:  # one client's trouble never ends the server
                    log.exception("control connection failed")
                finally:
                    conn.finish()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            short_of: str | None = None  # what accept lacked, while it lacks it
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_RETRY:
                        raise
                    if short_of is None:  # once, not ten times a second
                        log.warning(
                            "control socket: cannot accept now (%s); retrying every 0.1 s "
                            "(raise the hard limit on open files for more apps)",
                            exc.strerror,
                        )
                    short_of = exc.strerror or str(exc)
                    await trio.sleep(0.1)
                    continue
                if short_of is not None:
                    log.warning("control socket: accepting again (was: %s)", short_of)
                    short_of = None
                nursery.start_soon(run_one, sock)
    finally:
        listener.close()
        if still_ours():
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # the directory was made read-only meanwhile
                # Said, not raised: the daemon stops all the same (a gossiping
                # one still leaves its cluster), and the next one replaces it.
                log.warning(
                    "control socket not removed path=%s reason=%s: the next daemon replaces it",
                    path,
                    exc.strerror,
                )


# -- clients -------------------------------------------------------------------

#: Bytes of a unix socket's path (sun_path; Linux needs no terminating NUL).
MAX_SOCKET_PATH = 108


def _check_server(sock: socket.socket, path: Path) -> None:
    """Refuse a control socket served by another user (who made the directory first)."""
    uid = peer_uid(sock)
    if uid != os.getuid():
        raise ControlError(
            f"the daemon at {path} runs as uid {uid}, not as you (uid {os.getuid()}); "
            f"remove {path.parent} or choose another --runtime-dir",
            err=errno.EACCES,
        )


def command_for(command: str, runtime: Path) -> str:
    """*command* as typed for the daemon of the runtime directory *runtime*."""
    if runtime != runtime_dir():
        command += f" --runtime-dir {runtime}"
    return command


def _connect_error(path: Path, exc: OSError) -> ControlError:
    if exc.errno == errno.EACCES:
        with contextlib.suppress(OSError):
            owner = path.parent.stat().st_uid
            if owner != os.getuid():  # no daemon of ours can serve there either
                return ControlError(
                    f"runtime directory {path.parent} belongs to uid {owner}, not to you "
                    f"(uid {os.getuid()}); choose another with --runtime-dir",
                    err=errno.EACCES,
                )
    if exc.errno == errno.ENOTDIR:  # "start one with" would fail there as well
        return ControlError(
            f"cannot use runtime directory {path.parent}: {exc.strerror}; choose another "
            "with --runtime-dir",
            err=errno.ENOTDIR,
        )
    start = command_for("axnet daemon", path.parent)
    return DaemonUnavailable(
        f"no axnet daemon at {path} ({exc.strerror}); start one with: {start}",
        err=exc.errno or errno.ECONNREFUSED,
    )


def _unusable_socket_path(path: Path, exc: OSError) -> str:
    """Why the control socket cannot be at *path*, and what to do."""
    if exc.errno is None:
        return (
            f"the control socket path {path} is {len(os.fsencode(path))} bytes, longer than "
            f"a unix socket's {MAX_SOCKET_PATH}; choose a shorter --runtime-dir "
            "(or AXNET_RUNTIME_DIR)"
        )
    return (
        f"cannot make the control socket {path}: {exc.strerror}; choose another "
        "--runtime-dir (or AXNET_RUNTIME_DIR)"
    )


#: Seconds between connects to a daemon whose queue of connections is full.
CONNECT_RETRY_S = 0.01


def _try_connect(path: Path, timeout: float) -> socket.socket | None:
    """A socket connected to the daemon at *path*, checked to be this
    user's, with *timeout* set (0: non-blocking); None when the daemon's
    queue is full.  A unix socket with a timeout connects without waiting:
    on a full queue (many commands at once) that fails with EAGAIN, though
    the daemon is there, and is worth trying again; any other failure
    means no daemon."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        _check_server(sock, path)
    except BlockingIOError:
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        if exc.errno is None:  # "AF_UNIX path too long": no daemon can serve there
            raise ControlError(_unusable_socket_path(path, exc), err=errno.ENAMETOOLONG) from None
        raise _connect_error(path, exc) from None
    except ControlError:
        sock.close()
        raise
    return sock


def _queue_full(path: Path) -> ControlError:
    return _connect_error(path, BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN)))


def _connect(path: Path, timeout: float) -> socket.socket:
    """A socket connected to the daemon at *path*; a full queue is waited
    out until *timeout*."""
    deadline = time.monotonic() + timeout
    while (sock := _try_connect(path, timeout)) is None:
        if time.monotonic() >= deadline:
            raise _queue_full(path)
        time.sleep(CONNECT_RETRY_S)
    return sock


class ControlClient:
    """A blocking client for one-shot commands (``axnet services`` …)."""

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self.path = path
        self._sock = _connect(path, timeout)
        self._decoder = FrameDecoder()
        self._next_id = 0
        self._pending: list[Any] = []

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raise ControlError on refusal.

        A reply in parts (``more``, see Connection.reply_listing) comes back
        whole: the lists of its parts joined, in order.
        """
        parts: dict[str, list[object]] = {}
        self._next_id += 1
        ident = self._next_id
        try:
            self._sock.sendall(frame({"op": op, "id": ident, **fields}))
        except OSError as exc:
            raise ControlError(
                f"lost the daemon during '{op}': {exc.strerror}", err=exc.errno or 0
            ) from None
        while True:
            while self._pending:
                message = self._pending.pop(0)
                if isinstance(message, dict) and message.get("id") == ident:
                    if not message.get("ok"):
                        raise ControlError(
                            str(message.get("error", "request failed")),
                            err=int(message.get("errno") or 0),
                        )
                    for key, value in message.items():
                        if isinstance(value, list):
                            parts.setdefault(key, []).extend(value)
                    if message.get("more") is True:
                        continue
                    return {**message, **parts}
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"the daemon did not answer '{op}' in time") from None
            except OSError as exc:
                raise ControlError(
                    f"lost the daemon during '{op}': {exc.strerror}", err=exc.errno or 0
                ) from None
            if not data:
                raise ControlError(f"the daemon closed the connection during '{op}'")
            self._pending += self._decoder.feed(data)


#: Seconds a supervisor tries to connect to a daemon whose queue is full.
SESSION_CONNECT_S = 10.0


async def open_session(path: Path) -> trio.SocketStream:
    """Open a trio stream to the daemon (a supervisor's long-lived session);
    a full queue is waited out, as by the blocking client (_try_connect)."""
    deadline = trio.current_time() + SESSION_CONNECT_S
    while (sock := _try_connect(path, 0.0)) is None:
        if trio.current_time() >= deadline:
            raise _queue_full(path)
        await trio.sleep(CONNECT_RETRY_S)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
