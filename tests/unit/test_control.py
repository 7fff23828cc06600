"""The control API: runtime directory rules, and the socket server with its client."""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import itertools
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from axnet import _daemon as daemon_module
from axnet._control import (
    CONTROL_SOCKET,
    MERGE_PUSHES_AT,
    OUTBOX_BYTES,
    OUTBOX_MESSAGES,
    Connection,
    ControlClient,
    ControlError,
    DaemonUnavailable,
    control_path,
    open_session,
    peer_uid,
    prepare_runtime_dir,
    runtime_dir,
    serve_control,
)
from axnet._daemon import Daemon, DaemonConfig
from axnet._dirlock import DirLock
from axnet._leasefile import process_started
from axnet._leases import decode
from axnet._node import MAX_BLOCKS, NodeConfig
from axnet._supervisor import Session
from axnet._table import RealAddress, ServiceRecord, VirtualAddress, ip_address
from axnet._version import __version__
from axnet._wire import MAX_LABELS, FrameDecoder, frame, record_to_wire, records_from_wire

# -- runtime_dir ---------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("AXNET_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return monkeypatch


def test_runtime_dir_explicit_wins(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("AXNET_RUNTIME_DIR", "/env/axnet")
    clean_env.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert runtime_dir("/explicit") == Path("/explicit")
    assert runtime_dir(Path("/explicit")) == Path("/explicit")


def test_runtime_dir_env_var_comes_next(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("AXNET_RUNTIME_DIR", "/env/axnet")
    clean_env.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert runtime_dir() == Path("/env/axnet")
    assert runtime_dir(None) == Path("/env/axnet")
    assert runtime_dir("") == Path("/env/axnet")  # an empty --runtime-dir is no choice


def test_runtime_dir_xdg_comes_next(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert runtime_dir() == tmp_path / "axnet"
    clean_env.setenv("AXNET_RUNTIME_DIR", "")
    assert runtime_dir() == tmp_path / "axnet"


def test_runtime_dir_falls_back_to_tmp(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert runtime_dir() == Path(f"/tmp/axnet-{os.getuid()}")
    clean_env.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))  # not writable
    assert runtime_dir() == Path(f"/tmp/axnet-{os.getuid()}")


def test_control_path() -> None:
    assert control_path(Path("/run/x")) == Path("/run/x") / CONTROL_SOCKET


# -- prepare_runtime_dir -------------------------------------------------------


def test_a_runtime_dir_that_cannot_be_made_is_said_plainly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ControlError) as info:
        prepare_runtime_dir(tmp_path / "file" / "axnet")
    assert str(info.value) == (
        f"cannot use runtime directory {tmp_path / 'file' / 'axnet'}: Not a directory; "
        "choose another with --runtime-dir"
    )


def test_a_runtime_dir_that_is_a_file_is_said_to_be_one(tmp_path: Path) -> None:
    # Not "File exists" from the daemon, nor "start one with: axnet daemon"
    # (which would fail so) from a command.
    path = tmp_path / "file"
    path.write_text("")
    expected = (
        f"cannot use runtime directory {path}: Not a directory; choose another with --runtime-dir"
    )
    with pytest.raises(ControlError) as made:
        prepare_runtime_dir(path)
    assert str(made.value) == expected
    with pytest.raises(ControlError) as asked:
        ControlClient(path / CONTROL_SOCKET)
    assert str(asked.value) == expected
    assert not isinstance(asked.value, DaemonUnavailable)


def test_prepare_runtime_dir_creates_a_private_dir(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b"
    prepare_runtime_dir(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    prepare_runtime_dir(path)  # again: fine


def test_prepare_runtime_dir_tightens_a_0755_dir(tmp_path: Path) -> None:
    path = tmp_path / "rt"
    path.mkdir()
    path.chmod(0o755)
    prepare_runtime_dir(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def _nobody() -> int | None:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None


def _nobody_as_root(what: str) -> int:
    """The uid of 'nobody', for a test that hands it something; skips
    where there is no such user, or where *what* needs root and we are not."""
    nobody = _nobody()
    if nobody is None:
        pytest.skip("no user 'nobody' on this system")
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root")
    return nobody


def test_prepare_runtime_dir_refuses_a_link_somebody_else_planted(tmp_path: Path) -> None:
    # In /tmp anyone can create /tmp/axnet-UID as a link to a directory of ours.
    nobody = _nobody_as_root("giving a link to nobody")
    ours = tmp_path / "home"
    ours.mkdir(mode=0o755)
    planted = tmp_path / "axnet-link"
    planted.symlink_to(ours)
    os.lchown(planted, nobody, nobody)
    with pytest.raises(ControlError, match=f"belongs to uid {nobody}, not to you"):
        prepare_runtime_dir(planted)
    assert stat.S_IMODE(ours.stat().st_mode) == 0o755  # left alone


def test_prepare_runtime_dir_follows_a_link_of_our_own(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(target)
    prepare_runtime_dir(link)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_prepare_runtime_dir_refuses_a_dir_of_somebody_else(tmp_path: Path) -> None:
    nobody = _nobody_as_root("giving a directory to nobody")
    path = tmp_path / "theirs"
    path.mkdir(mode=0o755)
    os.chown(path, nobody, nobody)
    with pytest.raises(ControlError) as info:
        prepare_runtime_dir(path)
    assert str(info.value) == (
        f"runtime directory {path} belongs to uid {nobody}, not to you "
        f"(uid {os.getuid()}); choose another with --runtime-dir"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # left alone


# -- server and client ------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="axctl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def echo(conn: Connection, _: Mapping[str, Any]) -> None:
    async for message in conn.messages():
        if message.get("op") == "fail":
            await conn.fail(message, "refused on purpose", errno.EPERM)
        else:
            await conn.reply(message, echo=message)


async def answer_nothing(conn: Connection, _: Mapping[str, Any]) -> None:
    async for _message in conn.messages():
        return  # read one request, then hang up


async def hang_up(conn: Connection, _: Mapping[str, Any]) -> None:
    return None  # hang up without reading: the kernel resets the connection


def test_peer_uid_of_a_socketpair_is_ours() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_uid(a) == os.getuid()


async def test_serve_control_answers_a_control_client(sock_dir: Path) -> None:
    path = sock_dir / CONTROL_SOCKET

    def talk() -> list[dict[str, Any]]:
        with ControlClient(path, timeout=5.0) as client:
            first = client.request("ping", n=1)
            second = client.request("ping", n=2)
            with pytest.raises(ControlError) as info:
                client.request("fail")
            assert str(info.value) == "refused on purpose"
            assert info.value.errno == errno.EPERM
            return [first, second]

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, echo)
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        replies = await trio.to_thread.run_sync(talk)
        nursery.cancel_scope.cancel()
    assert replies == [
        {"id": 1, "ok": True, "echo": {"op": "ping", "id": 1, "n": 1}},
        {"id": 2, "ok": True, "echo": {"op": "ping", "id": 2, "n": 2}},
    ]
    assert not path.exists()  # the server removes its socket when it stops


async def _status_against(path: Path, handler: Any) -> str:
    def talk() -> str:
        with ControlClient(path, timeout=5.0) as client, pytest.raises(ControlError) as info:
            client.request("status")
        return str(info.value)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        message = await trio.to_thread.run_sync(talk)
        nursery.cancel_scope.cancel()
    return message


async def test_a_client_sees_the_daemon_hang_up(sock_dir: Path) -> None:
    message = await _status_against(sock_dir / CONTROL_SOCKET, answer_nothing)
    assert message == "the daemon closed the connection during 'status'"


async def test_a_client_sees_the_daemon_reset_the_connection(sock_dir: Path) -> None:
    message = await _status_against(sock_dir / CONTROL_SOCKET, hang_up)
    assert "status" in message


async def test_the_server_drops_a_session_that_sends_garbage(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sock_dir / CONTROL_SOCKET
    caplog.set_level(logging.WARNING, logger="axnet")

    def talk() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5.0)
            raw.connect(str(path))
            raw.sendall(frame("not a map") + b"\xff\xff\xff\xff")
            return raw.recv(100)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, echo)
        assert await trio.to_thread.run_sync(talk) == b""
        nursery.cancel_scope.cancel()
    # Said, not only done: a client that cannot tell why it lost its daemon
    # leaves the log as the one place to look.
    assert "control client sent garbage" in caplog.text


async def test_serve_control_replaces_a_stale_socket(sock_dir: Path) -> None:
    path = sock_dir / CONTROL_SOCKET
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays; nobody listens
    assert path.exists()

    def talk() -> dict[str, Any]:
        with ControlClient(path, timeout=5.0) as client:
            return client.request("ping")

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, echo)
        assert (await trio.to_thread.run_sync(talk))["ok"] is True
        nursery.cancel_scope.cancel()


async def test_a_stale_socket_that_cannot_be_removed_is_said_with_what_to_do(
    sock_dir: Path,
) -> None:
    # A read-only runtime directory with a dead daemon's socket in it fails
    # the same way (EACCES, EROFS); as root, only a directory there does.
    path = sock_dir / CONTROL_SOCKET
    path.mkdir()
    with pytest.raises(ControlError) as info:
        await serve_control(path, echo)
    assert str(info.value) == (
        f"cannot remove {path}, which no daemon listens on (Is a directory); remove it "
        "by hand or choose another --runtime-dir (or AXNET_RUNTIME_DIR)"
    )
    assert info.value.errno == errno.EISDIR


async def test_a_socket_that_cannot_be_removed_at_the_stop_is_said_not_raised(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A runtime directory made read-only while the daemon ran (EACCES,
    # EROFS; as root, only a directory at the name fails so): the daemon
    # stopped with "axnet daemon: [Errno 13] Permission denied: PATH",
    # status 1, and a gossiping one did not leave its cluster.
    path = sock_dir / CONTROL_SOCKET
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, echo)
        path.unlink()
        (path / "inside").mkdir(parents=True)
        nursery.cancel_scope.cancel()
    assert f"control socket not removed path={path} reason=Is a directory" in caplog.text


async def test_serve_control_refuses_a_live_socket(sock_dir: Path) -> None:
    path = sock_dir / CONTROL_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(ControlError) as info:
            await serve_control(path, echo)
        # Not the default directory: 'axnet stop' alone would stop another daemon, or none.
        assert str(info.value) == (
            f"a daemon already listens on {path}; stop it with "
            f"'axnet stop --runtime-dir {sock_dir}' or choose another --runtime-dir"
        )
        assert path.exists()  # the other daemon's socket is left alone


async def test_a_second_daemon_on_one_runtime_dir_is_refused_even_mid_start(
    sock_dir: Path,
) -> None:
    # The lock is taken before anything else: a daemon started while the
    # first is between its bind and its listen is refused, where it used to
    # take the half-made socket for a stale one and replace it.
    first = DirLock.acquire(sock_dir)
    try:
        with pytest.raises(ControlError) as info, trio.fail_after(10):
            await _daemon(sock_dir).run()
        assert str(info.value) == (
            f"another axnet daemon runs on {sock_dir} (it holds a lock on it); "
            f"stop it with 'axnet stop --runtime-dir {sock_dir}', or choose another --runtime-dir"
        )
    finally:
        first.release()
    assert not (sock_dir / CONTROL_SOCKET).exists()


def test_a_refused_daemon_on_the_default_runtime_dir_names_plain_axnet_stop(
    sock_dir: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("AXNET_RUNTIME_DIR", str(sock_dir))
    first = DirLock.acquire(sock_dir)
    try:
        with pytest.raises(ControlError) as info:
            DirLock.acquire(sock_dir)
        assert str(info.value) == (
            f"another axnet daemon runs on {sock_dir} (it holds a lock on it); "
            "stop it with 'axnet stop', or choose another --runtime-dir"
        )
    finally:
        first.release()


async def test_files_removed_from_the_runtime_dir_leave_the_daemon_its_own(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # systemd-tmpfiles ages files in /tmp: a lock file removed so once made
    # the daemon take its directory for another's, stop writing leases and
    # leave its socket behind.  The lock is on the directory itself.
    daemon = _daemon(sock_dir)
    with caplog.at_level(logging.WARNING, logger="axnet.daemon"):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            for leftover in sock_dir.iterdir():
                if leftover.name != CONTROL_SOCKET:
                    leftover.unlink()
            await trio.to_thread.run_sync(_ping, control_path(sock_dir))
            daemon.stop()
    assert "was removed or replaced" not in caplog.text
    assert not (sock_dir / CONTROL_SOCKET).exists()
    assert (sock_dir / "leases").exists()


def _ping(path: Path) -> None:
    with ControlClient(path, timeout=5.0) as client:
        _attach(client, "a1", vip="10.1.0.5")


async def test_a_daemon_whose_dir_was_replaced_leaves_the_new_daemons_files_alone(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # logind removes /run/user/UID at logout; a new daemon makes it afresh.
    # The old one, stopping later, once removed the new one's socket and
    # wrote its own leases over the new one's.
    daemon = _daemon(sock_dir)
    path = control_path(sock_dir)
    with caplog.at_level(logging.WARNING, logger="axnet.daemon"):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            shutil.rmtree(sock_dir)
            sock_dir.mkdir(mode=0o700)
            newcomer = DirLock.acquire(sock_dir)  # the new daemon's
            try:
                path.write_text("the new daemon's socket")
                (sock_dir / "leases").write_bytes(b"the new daemon's leases")
                daemon.stop()
            finally:
                newcomer.release()
    assert path.read_text() == "the new daemon's socket"
    assert (sock_dir / "leases").read_bytes() == b"the new daemon's leases"
    assert caplog.text.count("was removed or replaced while this daemon ran") == 1


async def test_a_control_socket_path_too_long_is_named_with_what_to_do(sock_dir: Path) -> None:
    deep = sock_dir / ("d" * 100)
    deep.mkdir()
    path = deep / CONTROL_SOCKET
    expected = (
        f"the control socket path {path} is {len(str(path))} bytes, longer than a unix "
        "socket's 108; choose a shorter --runtime-dir (or AXNET_RUNTIME_DIR)"
    )
    with pytest.raises(ControlError) as served:
        await serve_control(path, echo)
    assert str(served.value) == expected
    with pytest.raises(ControlError) as asked:
        ControlClient(path, timeout=1.0).request("ping")
    assert str(asked.value) == expected
    assert not isinstance(asked.value, DaemonUnavailable)  # no "start one with" advice


def test_control_client_without_a_daemon_is_daemon_unavailable(
    sock_dir: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = sock_dir / CONTROL_SOCKET
    with pytest.raises(DaemonUnavailable) as info:
        ControlClient(path)
    assert info.value.errno == errno.ENOENT
    # Not the default directory: the command says which one.
    assert str(info.value) == (
        f"no axnet daemon at {path} (No such file or directory); "
        f"start one with: axnet daemon --runtime-dir {sock_dir}"
    )
    clean_env.setenv("AXNET_RUNTIME_DIR", str(sock_dir))
    with pytest.raises(DaemonUnavailable) as info:
        ControlClient(path)
    assert str(info.value).endswith("; start one with: axnet daemon")


# -- the daemon behind it ---------------------------------------------------------


def _daemon(runtime: Path) -> Daemon:
    node = NodeConfig(name="n1", real_host=ipaddress.ip_address("127.0.0.1"))
    return Daemon(DaemonConfig(node=node, runtime_dir=runtime))


def _attach(client: ControlClient, app_id: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"app_id": app_id, "pid": 1, "argv": ["app"], "claims": []}
    return client.request("attach", **{**base, **fields})


async def _with_daemon(runtime: Path, talk: Any, *, cluster: Any = None) -> Any:
    daemon = _daemon(runtime)
    daemon.cluster = cluster
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        with trio.fail_after(120):
            result = await trio.to_thread.run_sync(talk)
        daemon.stop()
    return result


@contextlib.contextmanager
def full_queue(path: Path) -> Iterator[None]:
    """A daemon at *path* whose queue of connections is full for 0.3 s;
    then it takes them, and answers the first request of the last with
    status of node n1."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(0)
        queued = []
        while True:  # connects that nobody accepts yet
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.setblocking(False)
            try:
                extra.connect(str(path))
            except BlockingIOError:
                extra.close()
                break
            queued.append(extra)

        def daemon() -> None:
            time.sleep(0.3)
            listener.settimeout(5)  # a client that gave up never comes
            with contextlib.suppress(OSError):
                for _ in range(len(queued) + 1):  # the queued, then our client
                    conn, _ = listener.accept()
                    queued.append(conn)
                conn.recv(4096)
                conn.sendall(frame({"id": 1, "ok": True, "node": "n1"}))

        answering = threading.Thread(target=daemon)
        answering.start()
        try:
            yield
        finally:
            answering.join()
            for sock in queued:
                sock.close()


def test_a_client_waits_out_a_full_connection_queue(sock_dir: Path) -> None:
    # Many commands at once fill the daemon's queue; a connect then fails at
    # once with EAGAIN.  Before, the client said there was no daemon.
    path = control_path(sock_dir)
    with full_queue(path), ControlClient(path, timeout=5.0) as client:
        assert client.request("status")["node"] == "n1"


async def test_a_supervisor_waits_out_a_full_connection_queue(sock_dir: Path) -> None:
    # As above, for an app's session; before, trio took the failed connect
    # for one in progress, and the daemon's uid for someone else's.
    path = control_path(sock_dir)
    with full_queue(path):
        stream = await open_session(path)
        async with stream:
            await stream.send_all(frame({"op": "status", "id": 1}))
            decoder = FrameDecoder()
            replies: list[Any] = []
            while not replies:
                replies += decoder.feed(await stream.receive_some())
        assert replies[0]["node"] == "n1"


async def test_a_daemon_that_does_not_gossip_says_so_alike_in_status_and_members(
    sock_dir: Path,
) -> None:
    def talk() -> tuple[Any, Any]:
        with ControlClient(control_path(sock_dir), timeout=5.0) as client:
            return client.request("status")["gossip"], client.request("members")["members"]

    gossip, [member] = await _with_daemon(sock_dir, talk)
    assert gossip is None and member["gossip"] is None  # not "" in one and null in the other
    assert member["incarnation"] is None  # a key that a gossiping daemon's members have


async def test_bad_numbers_are_refused_and_the_daemon_serves_on(sock_dir: Path) -> None:
    path = control_path(sock_dir)

    def talk() -> list[str]:
        errors = []
        with ControlClient(path, timeout=5.0) as client:
            for fields in (
                {"block": [70000, 70001]},
                {"pid": 1.5},
                {"pid": "1"},
                {"more_blocks": [[40100, 40000]]},
                {"more_blocks": [40100]},
                {"more_blocks": "x"},
                {"more_blocks": [[40000, 40009]] * MAX_BLOCKS},
            ):
                with pytest.raises(ControlError) as info:
                    _attach(client, "a1", **fields)
                assert info.value.errno == errno.EINVAL
                errors.append(str(info.value))
            vip = _attach(client, "a1")["vip"]
            for port in (70000, -1, True):
                with pytest.raises(ControlError) as info:
                    client.request("claim", vip=vip, vport=port)
                assert info.value.errno == errno.EINVAL
            for seq in ("1", 1.5, True):  # a supervisor's answer to a ping
                with pytest.raises(ControlError) as info:
                    client.request("applied", seq=seq)
                assert info.value.errno == errno.EINVAL
            assert client.request("status")["apps"] == 1
        return errors

    errors = await _with_daemon(sock_dir, talk)
    assert errors[0] == "bad request 'attach': bad port 70000"
    assert "lo above hi" in errors[3]
    assert "expected [lo, hi]" in errors[4]
    assert all("more_blocks" in e for e in errors[5:]), errors


async def test_an_app_re_attaching_names_its_other_blocks_and_gets_them_back(
    sock_dir: Path,
) -> None:
    # What a supervisor sends after a daemon restart: the block its connects
    # use, and the others it held, whose connections are still open.
    path = control_path(sock_dir)

    def talk() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with ControlClient(path, timeout=5.0) as client:
            reply = _attach(client, "a1", block=[40300, 40399], more_blocks=[[40100, 40199]])
            with ControlClient(path, timeout=5.0) as other:
                apps = other.request("apps")["apps"]
        return reply, apps

    reply, apps = await _with_daemon(sock_dir, talk)
    assert reply["block"] == [40300, 40399]
    assert reply["more_blocks"] == [[40100, 40199]]
    [app] = apps
    assert app["client_ports"] == "40300-40399,40100-40199"


async def test_a_stopped_daemon_leaves_leases_the_next_one_holds_for_its_apps(
    sock_dir: Path,
) -> None:
    # `axnet stop` while an app runs (this process stands for it): the
    # daemon writes its lease before the sessions close.  The next daemon
    # gives what it names to nobody else until the app re-attaches.
    path = control_path(sock_dir)

    def first() -> dict[str, Any]:
        with ControlClient(path, timeout=5.0) as client:
            reply = _attach(client, "a1", pid=os.getpid(), vip="10.1.0.5")
            # Written before the reply: a daemon killed from here on leaves
            # the next one holding the app's block.
            [early] = decode((sock_dir / "leases").read_bytes())
            assert [list(b) for b in early.blocks] == [reply["block"]]
            client.request("claim", vip="10.1.0.5", vport=80)
            client.request("listen", vip="10.1.0.5", vport=80)
            with ControlClient(path, timeout=5.0) as other:
                other.request("stop")
            # Held open until the daemon hangs up: the app runs on while it stops.
            deadline = time.monotonic() + 10
            with pytest.raises(ControlError):
                while time.monotonic() < deadline:
                    client.request("status")
                    time.sleep(0.01)
        return reply

    held = await _with_daemon(sock_dir, first)
    [lease] = decode((sock_dir / "leases").read_bytes())
    assert (lease.app_id, lease.pid, lease.started) == (
        "a1",
        os.getpid(),
        process_started(os.getpid()),
    )
    assert [list(b) for b in lease.blocks] == [held["block"]]
    assert [str(b.virtual) for b in lease.bindings] == ["10.1.0.5:80"]

    def second() -> tuple[dict[str, Any], int, dict[str, Any]]:
        with ControlClient(path, timeout=5.0) as newcomer:
            fresh = _attach(newcomer, "a2", vip="10.1.0.5")
            with pytest.raises(ControlError) as in_use:
                newcomer.request("claim", vip="10.1.0.5", vport=80)
        with ControlClient(path, timeout=5.0) as client:
            back = _attach(client, "a1", pid=os.getpid(), vip="10.1.0.5", block=held["block"])
            client.request("claim", vip="10.1.0.5", vport=80)
        return fresh, in_use.value.errno, back

    fresh, refused, back = await _with_daemon(sock_dir, second)
    assert fresh["block"] != held["block"]
    assert refused == errno.EADDRINUSE
    assert back["block"] == held["block"]


async def test_a_lease_file_that_cannot_be_written_is_said_once(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every change tries again; the warning comes once, not per app start.
    (sock_dir / "leases").mkdir()
    path = control_path(sock_dir)

    def talk() -> None:
        with ControlClient(path, timeout=5.0) as client:
            _attach(client, "a1", vip="10.1.0.5")
            for port in range(80, 85):
                client.request("claim", vip="10.1.0.5", vport=port)
                time.sleep(0.03)  # past the gap between writes: each is written

    with caplog.at_level(logging.INFO, logger="axnet.daemon"):
        await _with_daemon(sock_dir, talk)
        assert caplog.text.count("leases not written") == 1
        (sock_dir / "leases").rmdir()
        await _with_daemon(sock_dir, talk)
    assert caplog.text.count("leases not written") == 1
    assert [lease.app_id for lease in decode((sock_dir / "leases").read_bytes())] == []


async def test_a_lease_file_that_could_not_be_written_is_written_once_it_can_be(
    sock_dir: Path,
) -> None:
    # A full disk refused the write at the app's attach; once there is room
    # the leases are written without waiting for another change (a daemon
    # killed on a quiet node left the next one nothing to hold).
    (sock_dir / "leases").mkdir()  # as a full disk, which root cannot have
    path = control_path(sock_dir)

    def talk() -> None:
        with ControlClient(path, timeout=5.0) as client:
            _attach(client, "a1", pid=os.getpid(), vip="10.1.0.5")
            (sock_dir / "leases").rmdir()
            deadline = time.monotonic() + 60
            while not (sock_dir / "leases").is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
            leases = decode((sock_dir / "leases").read_bytes())
            assert [lease.app_id for lease in leases] == ["a1"]

    await _with_daemon(sock_dir, talk)


async def test_lease_writes_take_a_small_share_of_the_daemons_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    # The file is written whole: with thousands of bindings a write takes
    # milliseconds, and a bind storm re-triggered one every 20 ms, so that
    # each bind cost more the more there were (3000 took 20 s).
    daemon = _daemon(tmp_path)
    writes: list[tuple[float, float]] = []

    async def slow_save() -> float:
        writes.append((trio.current_time(), trio.current_time() + slowness))
        await trio.sleep(slowness)
        return slowness

    slowness = 0.1

    monkeypatch.setattr(daemon, "_save_leases", slow_save)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon._write_leases)
        for _ in range(300):  # a change every 10 ms for 3 s
            daemon._leases_changed.set()
            await trio.sleep(0.01)
        last_change = trio.current_time()
        await trio.sleep(5)
        gaps = [nxt[0] - end for (_, end), nxt in itertools.pairwise(writes)]
        assert gaps and min(gaps) >= 10 * 0.1
        assert writes[-1][0] >= last_change - 0.01  # the last change is written too
        # However slow a write was (a disk stalled), the next waits a second at most.
        slowness, writes[:] = 5.0, []
        for _ in range(2):
            daemon._leases_changed.set()
            await trio.sleep(5.5)
        nursery.cancel_scope.cancel()
    assert writes[1][0] - writes[0][1] <= 1.0


async def test_a_request_quoting_megabytes_is_refused_briefly_and_the_session_goes_on(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Errors quote what the client sent: an op of 5 MB of NULs, as a repr,
    # once made a 20 MB answer that no frame holds; the session ended, and
    # the log took a 25 MB traceback.
    path = control_path(sock_dir)

    def talk() -> list[ControlError]:
        errors = []
        with ControlClient(path, timeout=30.0) as client:
            _attach(client, "a1")
            for op, fields in (("\x00" * 5_000_000, {}), ("claim", {"vip": "\x00" * 5_000_000})):
                with pytest.raises(ControlError) as info:
                    client.request(op, **fields)
                errors.append(info.value)
            assert client.request("status")["apps"] == 1  # still attached
        return errors

    errors = await _with_daemon(sock_dir, talk)
    assert [e.errno for e in errors] == [errno.EINVAL, errno.EINVAL]
    assert str(errors[0]).startswith("unknown operation '\\x00\\x00")
    assert all(len(str(e)) <= 1000 for e in errors)
    assert "control connection failed" not in caplog.text


async def test_a_real_port_is_granted_only_from_the_apps_own_block(sock_dir: Path) -> None:
    path = control_path(sock_dir)

    def talk() -> list[tuple[int, int]]:
        with ControlClient(path, timeout=5.0) as client:
            reply = _attach(client, "a1")
            vip, (lo, hi) = reply["vip"], reply["block"]
            got = []
            for port in (lo + 5, hi + 1, 20000):
                claim = client.request("claim", vip=vip, vport=port, real_port=port)
                got.append((claim["real_port"], claim["vport"]))
            # The same port twice is in use, whatever real port is asked for.
            with pytest.raises(ControlError) as info:
                client.request("claim", vip=vip, vport=lo + 5, real_port=lo + 5)
            assert info.value.errno == errno.EADDRINUSE
        return [(lo, hi), *got]

    (lo, hi), in_block, past_block, pool = await _with_daemon(sock_dir, talk)
    assert in_block == (lo + 5, lo + 5)
    # Outside it the pool gives a port, as to any claim.
    assert past_block[1] == hi + 1
    assert past_block[0] != hi + 1
    assert pool[1] == 20000
    assert pool[0] not in (20000, past_block[0])


async def test_an_app_that_used_up_its_block_is_granted_more(sock_dir: Path) -> None:
    path = control_path(sock_dir)

    def talk() -> tuple[list[Any], list[dict[str, Any]], int]:
        with ControlClient(path, timeout=5.0) as client:
            with pytest.raises(ControlError) as info:
                client.request("more-ports")
            refused = info.value.errno
            reply = _attach(client, "a1")
            blocks = [reply["block"]]
            for _ in range(MAX_BLOCKS):
                blocks.append(client.request("more-ports")["block"])
            # A real port is granted from any of them.
            lo = blocks[2][0]
            claim = client.request("claim", vip=reply["vip"], vport=lo, real_port=lo)
            assert claim["real_port"] == lo
            with ControlClient(path, timeout=5.0) as other:
                apps = other.request("apps")["apps"]
        return blocks, apps, refused

    blocks, apps, refused = await _with_daemon(sock_dir, talk)
    assert refused == errno.EPERM  # only for an attached app
    granted, past = blocks[:MAX_BLOCKS], blocks[MAX_BLOCKS:]
    assert all(isinstance(b, list) for b in granted)
    assert len({tuple(b) for b in granted}) == MAX_BLOCKS
    assert past == [None]
    # One app, listed with all its blocks.
    [app] = apps
    assert app["client_ports"] == ",".join(f"{lo}-{hi}" for lo, hi in granted)


async def test_join_and_leave_without_gossip_say_how_to_cluster(sock_dir: Path) -> None:
    path = control_path(sock_dir)

    def talk() -> list[str]:
        errors = []
        with ControlClient(path, timeout=5.0) as client:
            for op, fields in (("join", {"seeds": ["192.0.2.1"]}), ("leave", {})):
                with pytest.raises(ControlError) as info:
                    client.request(op, **fields)
                assert info.value.errno == errno.ENOTCONN
                errors.append(str(info.value))
        return errors

    errors = await _with_daemon(sock_dir, talk)
    assert errors[0] == errors[1]
    assert errors[0].startswith("this daemon runs without gossip; restart it with ")


async def test_a_join_with_malformed_seeds_is_refused_before_any_lookup(sock_dir: Path) -> None:
    cluster = _SlowJoin()
    path = control_path(sock_dir)

    def talk() -> list[int]:
        errors = []
        with ControlClient(path, timeout=5.0) as client:
            # A text is no list (it was taken a character at a time, each
            # looked up), nor a number; none, too many, or empty ones.
            for seeds in ("abc", 7, [7], [], [""], ["h"] * 65, ["h" * 301], None):
                with pytest.raises(ControlError) as info:
                    client.request("join", seeds=seeds)
                errors.append(info.value.errno)
            assert client.request("join", seeds=["192.0.2.1", "seed.example:7946"])["joined"] == 0
        return errors

    errors = await _with_daemon(sock_dir, talk, cluster=cluster)
    assert errors == [errno.EINVAL] * 8
    assert cluster.asked == [["192.0.2.1", "seed.example:7946"]]


async def test_a_malformed_attach_attaches_nothing(sock_dir: Path) -> None:
    path = control_path(sock_dir)

    def talk() -> None:
        with ControlClient(path, timeout=5.0) as client:
            with pytest.raises(ControlError) as info:
                _attach(client, "a1", claims=[["10.77.0.9", 80, 20000, True], ["x"]])
            assert info.value.errno == errno.EINVAL
            assert client.request("status")["apps"] == 0
            assert client.request("services")["services"] == []
        with ControlClient(path, timeout=5.0) as client:
            assert _attach(client, "a1")["ok"] is True  # not "already attached"

    await _with_daemon(sock_dir, talk)


async def test_a_re_attach_says_where_its_bindings_are_beside_its_claims(sock_dir: Path) -> None:
    # Claims keep their four fields, which a daemon of the previous version
    # takes (a fifth made it refuse every re-attach); where each binding
    # is bound comes beside them, and without it, the node's address.
    path = control_path(sock_dir)

    def talk() -> dict[str, str]:
        with ControlClient(path, timeout=5.0) as a1, ControlClient(path, timeout=5.0) as a2:
            claims = [["10.77.0.9", 80, 20000, True]]
            _attach(a1, "a1", vip="10.77.0.9", claims=claims, claim_hosts=["127.0.0.2"])
            _attach(a2, "a2", vip="10.77.0.8", claims=[["10.77.0.8", 80, 20001, True]])
            services = a1.request("services")["services"]
            return {s["virtual"]: s["real"] for s in services}

    assert await _with_daemon(sock_dir, talk) == {
        "10.77.0.9:80": "127.0.0.2:20000",
        "10.77.0.8:80": "127.0.0.1:20001",
    }


def _attach_listening(sock: socket.socket, decoder: FrameDecoder, app_id: str) -> list[str]:
    """Attach *app_id* on *sock* and listen on its virtual IP's port 80, as
    a server's supervisor does; what came meanwhile (replies and pushes)."""
    sock.settimeout(10.0)
    seen: list[str] = []
    vip = ""
    requests: list[dict[str, Any]] = [
        {"op": "attach", "app_id": app_id, "claims": []},
        {"op": "claim", "vport": 80},
        {"op": "listen", "vport": 80},
    ]
    for ident, request in enumerate(requests, start=1):
        sock.sendall(frame({**request, "id": ident, **({"vip": vip} if vip else {})}))
        while seen.count("reply") < ident:
            for message in decoder.feed(sock.recv(1 << 20)):
                seen.append(str(message.get("push", "reply")))
                if message.get("id") == 1:
                    vip = str(message["vip"])
    return seen


def _read_until_ping(sock: socket.socket, decoder: FrameDecoder) -> tuple[list[str], int]:
    """The pushes a session receives up to a ping, and the ping's number."""
    kinds: list[str] = []
    while True:
        for message in decoder.feed(sock.recv(1 << 20)):
            if message.get("push") == "ping":
                return kinds, int(message["seq"])
            kinds.append(str(message.get("push", "reply")))


async def test_an_attach_is_answered_once_every_supervisor_here_applied_its_block(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server here must know a new app's block before the app connects, or
    # its accept names the node: the daemon pings every supervisor whose app
    # listens after the push and answers the attach once they answered
    # (PUSH_FLUSH_S at most).  One that does not listen is not waited for.
    monkeypatch.setattr(daemon_module, "PUSH_FLUSH_S", 60.0)
    path = control_path(sock_dir)

    def talk() -> tuple[list[str], bool, bool, str | None]:
        decoder = FrameDecoder()
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server,
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle,
        ):
            idle.connect(str(path))  # attached, listening nowhere, answering nothing
            idle.sendall(frame({"op": "attach", "id": 1, "app_id": "idle", "claims": []}))
            idle.settimeout(10.0)
            assert "vip" in FrameDecoder().feed(idle.recv(1 << 20))[0]
            server.connect(str(path))
            _attach_listening(server, decoder, "server")  # nobody else listens: no wait
            result: dict[str, str] = {}

            def attach_client() -> None:
                with ControlClient(path, timeout=30.0) as client:
                    result["vip"] = _attach(client, "client")["vip"]

            client = threading.Thread(target=attach_client)
            client.start()
            try:
                kinds, seq = _read_until_ping(server, decoder)
                client.join(0.5)
                waited = client.is_alive()  # its reply waits for the server's answer
                server.sendall(frame({"op": "applied", "seq": seq}))
                client.join(10.0)
                answered = not client.is_alive()
            finally:
                client.join()
        return kinds, waited, answered, result.get("vip")

    kinds, waited, answered, vip = await _with_daemon(sock_dir, talk)
    assert kinds == ["records"]  # the client's block, then the ping
    assert waited and answered and vip


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def _answer_pings(sock: socket.socket, decoder: FrameDecoder, seen: list[str]) -> None:
    """Be a supervisor: answer each ping, note what came, until the daemon hangs up."""
    with contextlib.suppress(OSError):
        while data := sock.recv(1 << 20):
            for message in decoder.feed(data):
                seen.append(str(message.get("push", "reply")))
                if message.get("push") == "ping":
                    sock.sendall(frame({"op": "applied", "seq": message["seq"]}))


async def test_an_app_that_asks_for_more_ports_is_not_waited_for_itself(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its requests are handled one at a time: an answer to a ping sent while
    # its more-ports is handled would be read only after it.  Waiting for it
    # held every block after the first PUSH_FLUSH_S (0.25 s) in the app's
    # connect: wrk's p99 under Connection: close was 250 ms, against 10.
    monkeypatch.setattr(daemon_module, "PUSH_FLUSH_S", 60.0)
    path = control_path(sock_dir)

    def talk() -> tuple[list[str], list[str]]:
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server,
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client,
        ):
            server.connect(str(path))
            server_decoder = FrameDecoder()
            server_saw = _attach_listening(server, server_decoder, "server")
            answering = threading.Thread(
                target=_answer_pings, args=(server, server_decoder, server_saw)
            )
            answering.start()
            client.connect(str(path))
            client.settimeout(10.0)
            decoder, client_saw = FrameDecoder(), list[str]()
            try:
                for replies, request in enumerate(
                    (
                        {"op": "attach", "id": 1, "app_id": "client", "claims": []},
                        {"op": "more-ports", "id": 2},
                    ),
                    start=1,
                ):
                    client.sendall(frame(request))
                    while client_saw.count("reply") < replies:
                        for message in decoder.feed(client.recv(1 << 20)):
                            client_saw.append(str(message.get("push", "reply")))
            finally:
                server.shutdown(socket.SHUT_RDWR)
                answering.join()
        return client_saw, server_saw

    client_saw, server_saw = await _with_daemon(sock_dir, talk)
    # The block's alias record, then the reply; the other supervisor was
    # waited for (pinged) at the client's attach and at its more-ports.
    assert client_saw == ["reply", "records", "reply"]
    assert server_saw.count("ping") == 2


async def test_two_apps_granted_blocks_at_once_do_not_wait_for_each_other(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each grant waits for the other supervisor's answer to its ping; an
    # answer read only after the session's own request was handled held
    # both for PUSH_FLUSH_S.
    monkeypatch.setattr(daemon_module, "PUSH_FLUSH_S", 60.0)
    path = control_path(sock_dir)

    def talk() -> list[list[str]]:
        sessions = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        seen: list[list[str]] = [[], []]
        decoders = [FrameDecoder(), FrameDecoder()]
        threads = [
            threading.Thread(target=_answer_pings, args=(sock, decoder, saw))
            for sock, decoder, saw in zip(sessions, decoders, seen, strict=True)
        ]
        try:
            for i, (sock, thread) in enumerate(zip(sessions, threads, strict=True)):
                sock.connect(str(path))
                # Both listen: each grant waits for the other's answer.
                seen[i] += _attach_listening(sock, decoders[i], f"a{i}")
                thread.start()
            for sock in sessions:
                sock.sendall(frame({"op": "more-ports", "id": 4}))
            wait_for("both granted", lambda: all(saw.count("reply") == 4 for saw in seen))
        finally:
            for sock in sessions:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for thread in threads:
                if thread.is_alive():
                    thread.join()
            for sock in sessions:
                sock.close()
        return seen

    seen = await _with_daemon(sock_dir, talk)
    assert [saw.count("reply") for saw in seen] == [4, 4]


async def test_a_session_that_stops_reading_holds_up_nobody(sock_dir: Path) -> None:
    # An `axnet run` stopped with Ctrl-Z reads nothing; every table change is
    # pushed to it too.  Other apps must still be answered, and it is dropped.
    path = control_path(sock_dir)

    def talk() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
            stalled.connect(str(path))
            stalled.sendall(frame({"op": "attach", "id": 1, "app_id": "stalled", "claims": []}))
            with ControlClient(path, timeout=10.0) as client:
                vip = _attach(client, "busy")["vip"]
                for port in range(1, 3001):  # two pushes each, to every session
                    client.request("claim", vip=vip, vport=port)
                    client.request("listen", vip=vip, vport=port)
                    client.request("release", vip=vip, vport=port)
            # Dropped, or (with large socket buffers) all of it still queued:
            # either way the busy app above was never held up.
            stalled.settimeout(2.0)
            received = b""
            with contextlib.suppress(TimeoutError):
                while chunk := stalled.recv(1 << 20):
                    received += chunk
            return received

    received = await _with_daemon(sock_dir, talk)
    assert received  # its attach was answered, before it stopped reading


class _SlowJoin:
    """A cluster whose start-up join is over only when the test says so."""

    def __init__(self) -> None:
        self.joined = trio.Event()
        self.asked: list[object] = []

    def publish(self, records: object) -> None:
        pass

    async def deliver(self, records: object) -> list[str]:
        return []

    def members(self) -> list[dict[str, Any]]:
        return []

    async def join(self, seeds: object) -> int:
        self.asked.append(seeds)
        return 0

    async def leave(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    def name_conflicts(self) -> list[str]:
        return []

    def unresolved_seeds(self) -> dict[str, str]:
        return {}

    def self_seeds(self) -> list[str]:
        return []

    def unfit(self, record: object) -> str | None:
        return None

    def joining(self) -> bool:
        return not self.joined.is_set()

    async def wait_joined(self) -> None:
        await self.joined.wait()


def _pushes(sock: socket.socket, decoder: FrameDecoder, seconds: float) -> list[str]:
    """The kinds of the pushes that come within *seconds*."""
    sock.settimeout(seconds)
    kinds = []
    with contextlib.suppress(TimeoutError):
        while data := sock.recv(1 << 20):
            kinds += [m["push"] for m in decoder.feed(data) if "push" in m]
    return kinds


async def test_a_daemon_settles_once_its_start_up_join_is_over(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_module, "SETTLE_S", 0.2)
    daemon = _daemon(sock_dir)
    cluster = _SlowJoin()
    daemon.cluster = cluster
    path = control_path(sock_dir)
    decoder = FrameDecoder()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)

            def attach() -> dict[str, Any]:
                sock.connect(str(path))
                sock.sendall(frame({"op": "attach", "id": 1, "app_id": "a1", "claims": []}))
                sock.settimeout(10.0)
                reply: dict[str, Any] = decoder.feed(sock.recv(1 << 20))[0]
                return reply

            reply = await trio.to_thread.run_sync(attach)
            # Past SETTLE_S, still joining: settling on, no "settled" yet.
            assert reply["settling"] > 50
            assert "settled" not in await trio.to_thread.run_sync(_pushes, sock, decoder, 0.5)
            cluster.joined.set()
            assert "settled" in await trio.to_thread.run_sync(_pushes, sock, decoder, 2.0)
            # A supervisor attaching now keeps nothing.

            def attach_another() -> Any:
                with ControlClient(path, timeout=5.0) as client:
                    return _attach(client, "a2")["settling"]

            assert await trio.to_thread.run_sync(attach_another) == 0
            daemon.stop()


def _services_received(sock: socket.socket, want: int) -> set[str]:
    """Virtual IPs of the service records in the attach reply and the pushes
    after it, once *want* of them came."""
    decoder, got = FrameDecoder(), set[str]()
    sock.settimeout(30.0)
    while len(got) < want:
        data = sock.recv(1 << 20)
        assert data, f"the daemon hung up after {len(got)} of {want} services"
        for message in decoder.feed(data):
            assert message.get("ok", True) is True, message
            got |= {r[1] for r in message.get("records") or [] if r[0] == "s"}
    return got


def _remote_services(
    count: int, *, name: str = "", labels: list[list[str]] | None = None
) -> list[list[object]]:
    """*count* wire service records of another node, on distinct virtual IPs."""
    return [
        [
            "s",
            f"10.9.{i // 250}.{i % 250 + 1}",
            80,
            "192.0.2.9",
            20000 + i,
            "n2",
            f"b{i}",
            name,
            labels or [],
            1,
            False,
            0.0,
        ]
        for i in range(count)
    ]


async def test_a_table_bigger_than_a_frame_reaches_every_supervisor(sock_dir: Path) -> None:
    # A peer's push-pull may carry more than one control frame holds (16 MB):
    # 2 500 records of ~11 KB here.  Before, pushing it raised and ended the daemon.
    path = control_path(sock_dir)
    daemon = _daemon(sock_dir)
    labels = [[f"{i:02d}" + "k" * 61, "v" * 255] for i in range(MAX_LABELS)]
    wire = _remote_services(2500, name="s", labels=labels)

    def attach(sock: socket.socket, app_id: str) -> None:
        sock.connect(str(path))
        sock.sendall(frame({"op": "attach", "id": 1, "app_id": app_id, "claims": []}))

    def talk() -> tuple[set[str], set[str]]:
        with socket.socket(socket.AF_UNIX) as early, socket.socket(socket.AF_UNIX) as late:
            attach(early, "early")
            _services_received(early, 0)
            decoded = records_from_wire(wire)
            assert decoded.dropped == 0
            merged = trio.from_thread.run_sync(daemon.merge_remote, decoded.records)
            trio.from_thread.run(functools.partial(daemon.changed, merged.accepted, local=False))
            pushed = _services_received(early, len(wire))
            attach(late, "late")
            snapshot = _services_received(late, len(wire))
            with ControlClient(path, timeout=5.0) as client:
                assert client.request("status")["apps"] == 2
        return pushed, snapshot

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        with trio.fail_after(120):
            pushed, snapshot = await trio.to_thread.run_sync(talk)
        daemon.stop()
    assert pushed == snapshot == {r[1] for r in wire}


async def test_listings_bigger_than_a_frame_come_whole(sock_dir: Path) -> None:
    # 2 500 services of ~11 KB: about 27 MB, where a frame holds 16 MB.
    path = control_path(sock_dir)
    daemon = _daemon(sock_dir)
    labels = [[f"{i:02d}" + "k" * 61, "v" * 255] for i in range(MAX_LABELS)]
    wire = _remote_services(2500, name="s", labels=labels)

    def talk() -> tuple[list[dict[str, Any]], list[list[object]], dict[str, Any]]:
        with ControlClient(path, timeout=30.0) as client:
            return (
                client.request("services")["services"],
                client.request("records")["records"],
                client.request("status"),
            )

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await daemon.changed(
            daemon.merge_remote(records_from_wire(wire).records).accepted, local=False
        )
        with trio.fail_after(120):
            services, records, status = await trio.to_thread.run_sync(talk)
        daemon.stop()
    assert [s["virtual"] for s in services] == [f"{r[1]}:80" for r in wire]
    assert records == wire
    assert status["services"] == 2500  # the connection still serves after the parts


async def test_apps_lists_a_peers_app_whose_id_ends_in_another_kind_of_digit(
    sock_dir: Path,
) -> None:
    # "²" passes str.isdigit() but not int(): such an app id, from any peer,
    # once made every `axnet apps` of every node fail.
    path = control_path(sock_dir)
    daemon = _daemon(sock_dir)
    app_id = "web+\u00b2"
    wire = ["a", app_id, "n2", "10.77.0.5", "192.0.2.2", 40000, 40255, "", [], 1, False, 0.0]

    def talk() -> list[dict[str, Any]]:
        with ControlClient(path, timeout=5.0) as client:
            apps: list[dict[str, Any]] = client.request("apps")["apps"]
            return apps

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        daemon.merge_remote(records_from_wire([wire]).records)
        with trio.fail_after(60):
            apps = await trio.to_thread.run_sync(talk)
        daemon.stop()
    assert [(a["app"], a["node"], a["client_ports"]) for a in apps] == [
        (app_id, "n2", "40000-40255")
    ]


async def test_an_attach_waits_for_the_whole_table(sock_dir: Path) -> None:
    # A table larger than a frame comes as the reply and pushes after it: the
    # supervisor's handshake returns only once all of it is in.
    daemon = _daemon(sock_dir)
    wire = _remote_services(2500)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await daemon.changed(
            daemon.merge_remote(records_from_wire(wire).records).accepted, local=False
        )
        session = Session(await open_session(control_path(sock_dir)))
        with trio.fail_after(30):
            reply, later = await session.handshake(
                "attach", {"app_id": "a1", "pid": 1, "argv": ["app"], "claims": []}
            )
        await session.stream.aclose()
        daemon.stop()
    got = [*reply["records"], *(r for push in later for r in push["records"])]
    assert reply["more"] == 2500 + 1 - 1000  # the app's own record too
    assert {r[1] for r in got if r[0] == "s"} == {r[1] for r in wire}


def test_a_client_refuses_a_daemon_of_another_user(sock_dir: Path) -> None:
    # In /tmp, another user could make the runtime directory first and serve
    # a socket there: no argv, pid or address of ours goes to it.
    nobody = _nobody()
    if nobody is None or os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("serving a socket as another user needs root, setpriv and 'nobody'")
    sock_dir.chmod(0o777)
    path = sock_dir / CONTROL_SOCKET
    server = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={nobody}",
            f"--regid={nobody}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]);"
            " s.listen(); print(1, flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None and server.stdout.readline()
        with pytest.raises(ControlError) as info:
            ControlClient(path)
        assert info.value.errno == errno.EACCES
        assert str(info.value) == (
            f"the daemon at {path} runs as uid {nobody}, not as you (uid {os.getuid()}); "
            f"remove {sock_dir} or choose another --runtime-dir"
        )
    finally:
        server.kill()
        server.wait()


async def test_stop_is_answered_before_the_daemon_stops(sock_dir: Path) -> None:
    path = control_path(sock_dir)
    for _ in range(5):  # the answer and the shutdown race; it must always win
        daemon = _daemon(sock_dir)
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)

            def stop() -> dict[str, Any]:
                with ControlClient(path, timeout=5.0) as client:
                    return client.request("stop")

            assert (await trio.to_thread.run_sync(stop))["ok"] is True


@pytest.mark.parametrize("size", [100, 4 << 20])
async def test_a_client_that_stops_reading_is_dropped_at_a_bound(size: int) -> None:
    # Nothing writes this outbox out (as for an `axnet run` stopped with Ctrl-Z):
    # it holds at most OUTBOX_MESSAGES messages and OUTBOX_BYTES bytes.
    message = {"push": "records", "body": b"x" * size}
    fit = min(OUTBOX_MESSAGES, OUTBOX_BYTES // len(frame(message)))
    ours, theirs = trio.socket.socketpair()
    with theirs:
        conn = Connection(trio.SocketStream(ours))
        sent = 0
        while not conn.closed and sent <= OUTBOX_MESSAGES:
            await conn.send(message)
            sent += 1
        assert conn.closed
        assert sent == fit + 1  # the one that did not fit dropped the client


def _service_wire(port: int, version: int) -> list[object]:
    """A service record at 10.1.0.5:*port*, in wire form."""
    record = ServiceRecord(
        virtual=VirtualAddress(ip=ip_address("10.1.0.5"), port=port),
        real=RealAddress(host=ip_address("127.0.0.1"), port=20000 + port),
        node="n1",
        app_id="a1",
        version=version,
    )
    return record_to_wire(record)


async def test_a_client_behind_gets_table_pushes_merged_not_dropped() -> None:
    # A supervisor stopped with Ctrl-Z while the table churns: before, 4096
    # pushes dropped it, and its app's services were withdrawn meanwhile.
    # Now its pushes are held, the latest record of each key, and written
    # once it reads again, before anything queued after them.
    ours, theirs = trio.socket.socketpair()
    conn = Connection(trio.SocketStream(ours))
    changes, keys = 20_000, 50
    latest: dict[int, int] = {}
    for version in range(1, changes + 1):
        port = version % keys
        await conn.push_records([_service_wire(port, version)])
        latest[port] = version
    assert not conn.closed
    await conn.reply({"id": 7}, after=True)
    seen: dict[int, int] = {}
    decoder = FrameDecoder()
    frames: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.write_out)
        with trio.fail_after(30):
            while not frames or frames[-1].get("id") != 7:
                frames += decoder.feed(await theirs.recv(1 << 16))
        conn.finish()
    theirs.close()
    for message in frames[:-1]:
        for got in records_from_wire(message["records"]).records:
            assert isinstance(got, ServiceRecord)
            seen[got.virtual.port] = got.version  # in order: the last is the latest
    assert seen == latest
    assert len(frames) < MERGE_PUSHES_AT + 10  # not a frame per change


async def test_held_pushes_go_out_once_the_client_catches_up_with_nothing_after() -> None:
    # No later message carries them out: the writer does, once it has
    # written what came before them.
    ours, theirs = trio.socket.socketpair()
    conn = Connection(trio.SocketStream(ours))
    for port in range(MERGE_PUSHES_AT + 50):  # past the mark: the last 50 are held
        await conn.push_records([_service_wire(port, 1)])
    seen: set[int] = set()
    decoder = FrameDecoder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.write_out)
        with trio.fail_after(30):
            while len(seen) < MERGE_PUSHES_AT + 50:
                for message in decoder.feed(await theirs.recv(1 << 16)):
                    for got in records_from_wire(message["records"]).records:
                        assert isinstance(got, ServiceRecord)
                        seen.add(got.virtual.port)
        conn.finish()
    theirs.close()


async def test_a_ping_answer_counts_only_for_a_ping_sent() -> None:
    # A supervisor answering pings it was never sent (a bug, or a hostile
    # process of the same user) must not make the daemon stop waiting.
    conn = Connection(None)  # type: ignore[arg-type]  # pings only queue: no stream used
    conn.applied(10**9)
    seq = await conn.ping()
    conn.applied(seq + 5)
    assert not conn.answers_pings
    conn.applied(seq)
    assert conn.answers_pings
    with trio.fail_after(5):
        await conn.wait_applied(seq)


async def test_status_says_the_daemons_version(sock_dir: Path) -> None:
    def talk() -> Any:
        with ControlClient(control_path(sock_dir), timeout=5.0) as client:
            return client.request("status")["version"]

    assert await _with_daemon(sock_dir, talk) == __version__
