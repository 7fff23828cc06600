"""Real children under the real filter: what they see, what the supervisor sees."""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from axnet.intercept import _bpf
from axnet.intercept._bpf import build_filter
from axnet.intercept._decode import Inet4, decode_sockaddr, encode_sockaddr
from axnet.intercept._launcher import LaunchError, launch
from axnet.intercept._libc import (
    PIDFD_THREAD,
    Notification,
    pidfd_getfd,
    pidfd_open,
    read_memory,
    write_memory,
)
from axnet.intercept._probe import probe_user_notification

from ._children import TIMEOUT, Child, python_child

REASON = probe_user_notification()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(TIMEOUT)
    try:
        yield sock
    finally:
        sock.close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def sockaddr_of(n: Notification) -> Inet4:
    addr = decode_sockaddr(read_memory(n.pid, n.args[1], n.args[2]))
    assert isinstance(addr, Inet4)
    return addr


def test_probe_says_yes_here() -> None:
    assert probe_user_notification() is None


def test_exec_failure_is_reported_exactly() -> None:
    with pytest.raises(LaunchError) as info:
        launch(["axnet-no-such-program"], env={"PATH": "/nonexistent"}, program=build_filter())
    assert str(info.value) == (
        "axnet run: cannot execute 'axnet-no-such-program': No such file or directory"
    )
    assert info.value.exit_code == 127  # not found, as a shell says


def test_an_empty_program_name_is_reported_not_run() -> None:
    # Python's exec refuses an empty argv[0] in the child: without a check
    # the app "ran" and exited 127 with nothing said.
    with pytest.raises(LaunchError) as info:
        launch([""], env=None, program=build_filter())
    assert str(info.value) == "axnet run: cannot execute '': No such file or directory"
    assert info.value.exit_code == 127


def test_a_script_without_an_interpreter_line_runs_in_the_shell(tmp_path: Path) -> None:
    # As execvp(3) does (env, nohup, a shell): not 126, "Exec format error".
    script, out = tmp_path / "script", tmp_path / "out"
    script.write_text('printf "%s %s" "$0" "$1" > "$2"\n')
    script.chmod(0o755)
    launched = launch(
        ["script", "arg", str(out)], env={"PATH": str(tmp_path)}, program=build_filter()
    )
    try:
        _, status = os.waitpid(launched.pid, 0)
    finally:
        launched.notify.close()
        os.close(launched.pidfd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out.read_text() == f"{script} arg"


def _exit_status(argv: list[str], path: list[Path]) -> int:
    launched = launch(argv, env={"PATH": os.pathsep.join(map(str, path))}, program=build_filter())
    try:
        _, status = os.waitpid(launched.pid, 0)
    finally:
        launched.notify.close()
        os.close(launched.pidfd)
    return os.waitstatus_to_exitcode(status)


def test_the_path_is_searched_as_execvp_searches_it(tmp_path: Path) -> None:
    # execvp(3) (env, nohup) runs the first file on PATH that the kernel
    # does not refuse outright, a file without #! in the shell: not a later
    # one that runs (Python's execvpe goes on past "Exec format error"),
    # and not 126 when a file before it may not be executed.
    out = tmp_path / "out"
    dirs = [tmp_path / name for name in ("plain", "shebang", "unexecutable", "after")]
    for directory in dirs:
        directory.mkdir()
    (dirs[0] / "prog").write_text(f"echo plain > {out}\n")
    (dirs[1] / "prog").write_text(f"#!/bin/sh\necho shebang > {out}\n")
    (dirs[2] / "prog").write_text(f"echo unexecutable > {out}\n")
    (dirs[3] / "prog").write_text(f"echo after > {out}\n")
    for directory, mode in zip(dirs, (0o755, 0o755, 0o644, 0o755), strict=True):
        (directory / "prog").chmod(mode)
    assert _exit_status(["prog"], dirs[:2]) == 0
    assert out.read_text() == "plain\n"
    assert _exit_status(["prog"], dirs[2:]) == 0
    assert out.read_text() == "after\n"


def test_exec_of_a_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match=r"cannot execute '/': Permission denied") as info:
        launch(["/"], env=None, program=build_filter())
    assert info.value.exit_code == 126  # found, not executable


def test_child_does_not_keep_the_notification_fd(tmp_path: Path) -> None:
    code = """
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[name] = os.readlink("/proc/self/fd/" + name)
    except OSError:
        pass
report(fds=fds, no_new_privs=open("/proc/self/status").read().split("NoNewPrivs:")[1].split()[0])
"""
    with python_child(code, tmp_path) as child:
        result = child.result()
    assert not any("seccomp" in target for target in result["fds"].values()), result
    assert result["no_new_privs"] == "1"


def test_io_uring_and_x32_get_enosys(tmp_path: Path) -> None:
    code = """
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for nr in (425, 426, 427, 0x40000000 | 39):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), ctypes.c_long(1), ctypes.c_void_p(0), ctypes.c_long(0))
    out[str(nr)] = [r, ctypes.get_errno()]
report(**out)
"""
    with python_child(code, tmp_path) as child:
        result = child.result()
    assert result == {str(nr): [-1, errno.ENOSYS] for nr in (425, 426, 427, 0x40000027)}


def test_connect_is_trapped_and_refused(tmp_path: Path) -> None:
    port = unused_port()
    code = f"""
s = socket.socket()
try:
    s.connect(("127.0.0.1", {port}))
    report(outcome="connected")
except OSError as e:
    report(outcome=e.errno)
"""
    with python_child(code, tmp_path) as child:
        n = child.notification()
        assert n.nr == _bpf.NR_CONNECT
        assert n.arch == _bpf.AUDIT_ARCH_X86_64
        assert n.pid == child.pid
        assert n.args[2] == 16
        assert sockaddr_of(n) == Inet4(LOOPBACK, port)
        assert child.launched.notify.id_valid(n.id)
        child.launched.notify.respond(n.id, error=errno.ECONNREFUSED)
        assert child.result() == {"outcome": errno.ECONNREFUSED}


def test_short_unix_addresses_never_reach_the_supervisor(tmp_path: Path) -> None:
    code = """
srv = socket.socket(socket.AF_UNIX)
srv.bind(b"\\0ax")            # addrlen 5
srv.listen(1)               # trapped: listen always is
cli = socket.socket(socket.AF_UNIX)
cli.connect(b"\\0ax")
cli.close()
srv.close()  # closed: no ResourceWarning repr (getsockname) at exit
report(ok=True)
"""
    with python_child(code, tmp_path) as child:
        n = child.notification()
        assert n.nr == _bpf.NR_LISTEN  # the bind before it was not trapped
        child.launched.notify.respond_continue(n.id)
        assert child.no_notification(0.5)
        assert child.result() == {"ok": True}


def test_supervisor_connects_the_apps_own_socket(tmp_path: Path, listener: socket.socket) -> None:
    """pidfd_getfd + connect on the app's behalf: the app's socket is connected for real."""
    virtual_port = unused_port()
    code = f"""
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.connect(("127.0.0.1", {virtual_port}))
s.sendall(b"ping")
report(peer=list(s.getpeername()), nodelay=s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
"""
    with python_child(code, tmp_path) as child:
        notify = child.launched.notify
        n = child.notification()
        assert n.nr == _bpf.NR_CONNECT
        assert sockaddr_of(n) == Inet4(LOOPBACK, virtual_port)
        pidfd = pidfd_open(n.pid)
        try:
            app_sock = socket.socket(fileno=pidfd_getfd(pidfd, n.args[0]))
        finally:
            os.close(pidfd)
        with app_sock:
            app_sock.connect(listener.getsockname())
        assert notify.id_valid(n.id)
        notify.respond(n.id)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            assert conn.recv(4) == b"ping"
            n = child.notification()
            assert n.nr == _bpf.NR_GETPEERNAME
            notify.respond_continue(n.id)
            result = child.result()
    assert result == {"peer": list(listener.getsockname()), "nodelay": 1}


def test_accept_is_emulated_with_addfd_send(tmp_path: Path) -> None:
    """The supervisor accepts on the app's behalf, writes a virtual peer, installs the fd."""
    code = """
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
conn, peer = srv.accept()
conn.sendall(b"hi")
report(fd=conn.fileno(), peer=list(peer), cloexec=not os.get_inheritable(conn.fileno()))
"""
    virtual_peer = Inet4(ipaddress.IPv4Address("10.1.0.7"), 4242)
    with python_child(code, tmp_path) as child:
        notify = child.launched.notify
        for expected in (_bpf.NR_BIND, _bpf.NR_LISTEN):
            n = child.notification()
            assert n.nr == expected
            notify.respond_continue(n.id)  # a test shortcut; the supervisor emulates these
        n = child.notification()
        assert n.nr == _bpf.NR_ACCEPT4
        app_fd, addr_ptr, addrlen_ptr = n.args[0], n.args[1], n.args[2]
        pidfd = pidfd_open(n.pid)
        try:
            app_listener = socket.socket(fileno=pidfd_getfd(pidfd, app_fd))
        finally:
            os.close(pidfd)
        with app_listener, socket.create_connection(app_listener.getsockname(), TIMEOUT) as cli:
            conn, _ = app_listener.accept()
            with conn:
                room = int.from_bytes(read_memory(n.pid, addrlen_ptr, 4), "little")
                encoded = encode_sockaddr(virtual_peer)
                assert room >= len(encoded)
                write_memory(n.pid, addr_ptr, encoded)
                write_memory(n.pid, addrlen_ptr, len(encoded).to_bytes(4, "little"))
                newfd = notify.addfd(n.id, conn.fileno(), send=True, cloexec=True)
            assert not notify.id_valid(n.id)  # SEND answered it
            result = child.result()  # CPython's accept() calls getsockname on the new fd
            cli.settimeout(TIMEOUT)
            assert cli.recv(2) == b"hi"
    assert result == {"fd": newfd, "peer": ["10.1.0.7", 4242], "cloexec": True}


def test_addfd_without_send_leaves_the_notification_pending(tmp_path: Path) -> None:
    code = """
s = socket.socket()
try:
    s.connect(("127.0.0.1", 9))
except OSError as e:
    report(err=e.errno)
"""
    with python_child(code, tmp_path) as child:
        notify = child.launched.notify
        n = child.notification()
        r, w = os.pipe()
        try:
            newfd = notify.addfd(n.id, r, send=False, cloexec=False)
        finally:
            os.close(r)
            os.close(w)
        assert newfd > 2
        assert notify.id_valid(n.id)
        notify.respond(n.id, error=errno.ENETUNREACH)
        assert child.result() == {"err": errno.ENETUNREACH}


def test_notification_is_invalid_once_the_app_dies(tmp_path: Path) -> None:
    code = """
socket.socket().connect(("127.0.0.1", 9))
"""
    with python_child(code, tmp_path) as child:
        notify = child.launched.notify
        n = child.notification()
        assert notify.id_valid(n.id)
        child.kill()
        assert child.wait() == -signal.SIGKILL
        assert not notify.id_valid(n.id)
        with pytest.raises(OSError) as info:
            notify.respond(n.id)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(OSError):
            read_memory(n.pid, n.args[1], 16)


def test_signals_do_not_abort_a_received_notification(tmp_path: Path) -> None:
    """WAIT_KILLABLE_RECV: a handled signal waits until the supervisor has answered."""
    code = """
hits = []
signal.signal(signal.SIGUSR1, lambda *_: hits.append(1))
s = socket.socket()
try:
    s.connect(("127.0.0.1", 9))
    err = 0
except OSError as e:
    err = e.errno
time.sleep(0.01)  # the Python-level handler runs at the next check of the eval loop
report(err=err, hits=len(hits))
"""
    with python_child(code, tmp_path) as child:
        notify = child.launched.notify
        n = child.notification()
        os.kill(child.pid, signal.SIGUSR1)
        time.sleep(0.1)
        assert notify.id_valid(n.id)  # not withdrawn and restarted
        assert child.no_notification(0.05)
        notify.respond(n.id, error=errno.ECONNREFUSED)
        assert child.result() == {"err": errno.ECONNREFUSED, "hits": 1}


def test_threads_notify_with_their_thread_id(tmp_path: Path) -> None:
    code = """
out = {}
def worker():
    out["tid"] = threading.get_native_id()
    try:
        socket.socket().connect(("127.0.0.1", 9))
    except OSError as e:
        out["err"] = e.errno
t = threading.Thread(target=worker)
t.start()
t.join()
report(**out)
"""
    with python_child(code, tmp_path) as child:
        n = child.notification()
        assert n.pid != child.pid
        with pytest.raises(OSError):
            pidfd_open(n.pid)
        pidfd = pidfd_open(n.pid, PIDFD_THREAD)
        try:
            os.close(pidfd_getfd(pidfd, n.args[0]))
        finally:
            os.close(pidfd)
        assert sockaddr_of(n).port == 9  # process_vm_readv takes the tid as it is
        child.launched.notify.respond(n.id, error=errno.ECONNREFUSED)
        result = child.result()
    assert result == {"tid": n.pid, "err": errno.ECONNREFUSED}


def test_children_of_the_app_inherit_the_filter(tmp_path: Path) -> None:
    code = """
pid = os.fork()
if pid == 0:
    try:
        socket.socket().connect(("127.0.0.1", 9))
    except OSError as e:
        os._exit(e.errno)
    os._exit(0)
_, status = os.waitpid(pid, 0)
report(grandchild=pid, code=os.waitstatus_to_exitcode(status))
"""
    with python_child(code, tmp_path) as child:
        n = child.notification()
        assert n.pid != child.pid
        child.launched.notify.respond(n.id, error=errno.EHOSTUNREACH)
        result = child.result()
    assert result == {"grandchild": n.pid, "code": errno.EHOSTUNREACH}


def test_child_helper_kills_on_exit(tmp_path: Path) -> None:
    with python_child("time.sleep(60)", tmp_path) as child:
        pid = child.pid
    assert isinstance(child, Child)
    assert child.status == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_listener_reports_hangup_once_the_app_is_gone(tmp_path: Path) -> None:
    """poll() on the listener gives POLLHUP (no POLLIN) after exit; recv then fails ENOENT."""
    with python_child("pass", tmp_path) as child:
        assert child.wait() == 0
        poller = select.poll()
        poller.register(child.launched.notify.fileno(), select.POLLIN)
        events = poller.poll(TIMEOUT * 1000)
        assert events
        assert events[0][1] & select.POLLHUP
        assert not events[0][1] & select.POLLIN
        with pytest.raises(OSError) as info:
            child.launched.notify.recv()
        assert info.value.errno == errno.ENOENT
