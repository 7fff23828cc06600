"""Fork, install the seccomp filter in the child, hand its listener to the parent, exec.

Theory of operation
-------------------
The filter must be in place before the application's first instruction, and
only the application (not the supervisor) may be filtered, so the child
installs it between fork and exec.  The listener fd the kernel returns lives
in the child; the parent takes its own copy with `pidfd_getfd` while the child
waits, and the child closes its copy before exec: an application holding its
own notification fd could answer its own syscalls.

Child and parent talk over two pipes:

* report (child -> parent, O_CLOEXEC): `F<fd>\\n` once the filter is installed,
  `S<errno>\\n` if installing failed, `X<errno>\\n` if exec failed.  EOF after
  `F` means exec succeeded, because exec closed the write end.
* ack (parent -> child): one byte once the parent holds the listener, or EOF
  if the parent gave up (the child then exits 127 without exec).

Between installing the filter and exec the child makes no trapped call (only
pipe I/O, close, signal reset and execve), so nothing waits on a supervisor
that is not listening yet.  The child never returns into the caller's code:
every path ends in exec or `os._exit`.

`launch` calls `os.fork()`: call it before any thread (trio included) starts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterable, Mapping, Sequence

import attrs

from ._libc import NotifyFd, install_filter, pidfd_getfd, pidfd_open, set_parent_death_signal

#: Exit status of a child that could not execute the application (as a shell does).
EXIT_CANNOT_EXECUTE = 127
_MAX_REPORT = 64


#: What runs an executable file that the kernel cannot (no ``#!`` line), as
#: glibc's execvp runs it.
_SHELL = "/bin/sh"

#: Exit status when axnet run itself fails to start the app.
EXIT_LAUNCHER = 125


class LaunchError(Exception):
    """The application could not be started; the message is for the user.

    ``exit_code`` follows the shell: 127 when the program was not found, 126
    when it was found but could not be executed; 125 when axnet run itself
    could not start it (as ``env`` and ``timeout`` say).
    """

    def __init__(self, message: str, *, exit_code: int = EXIT_LAUNCHER) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@attrs.frozen
class Launched:
    """A running application: its pid, a pidfd for it, and the supervisor's listener."""

    pid: int
    pidfd: int
    notify: NotifyFd


def launch(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    program: bytes,
    sigmask: Iterable[int] | None = None,
) -> Launched:
    """Start `argv` (searched on PATH) under the seccomp `program`.

    The program is SIGKILLed when the thread that called this ends (the
    kernel's parent-death signal): call it from the thread that supervises.
    It starts with the signal mask *sigmask* (default: the caller's).
    """
    if not argv:
        raise ValueError("argv must name a program to run")
    if isinstance(argv, str):
        raise TypeError("argv must be a sequence of arguments, not a string")
    args = list(argv)
    if not args[0]:
        # The kernel finds no file by that name; Python's exec refuses it
        # before asking, in the child, which would then end unexplained.
        raise LaunchError(
            f"axnet run: cannot execute '': {os.strerror(errno.ENOENT)}",
            exit_code=EXIT_CANNOT_EXECUTE,
        )
    environ = dict(os.environ if env is None else env)
    if (hidden := _unreadable(args[0], environ.get("PATH", os.defpath))) is not None:
        raise LaunchError(
            f"axnet run: {hidden} may be run but not read by you, and the kernel then hides "
            "the app's memory and sockets from axnet: each of its socket calls would fail; "
            "run a copy you may read",
        )
    report_r, report_w = os.pipe()
    ack_r, ack_w = os.pipe()
    try:
        pid = os.fork()
    except BaseException:
        for fd in (report_r, report_w, ack_r, ack_w):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - runs in the child, never returns
        _child(args, environ, program, report_w, ack_r, sigmask)
    os.close(report_w)
    os.close(ack_r)
    pidfd = notify_fd = -1
    try:
        kind, value = _read_message(report_r)
        if kind == "S":
            raise LaunchError(_filter_refused(args[0], value))
        if kind != "F":
            raise LaunchError(f"axnet run: launcher protocol error ({kind!r})")
        pidfd = pidfd_open(pid)
        notify_fd = pidfd_getfd(pidfd, value)
        os.write(ack_w, b"1")
        os.close(ack_w)
        ack_w = -1
        kind, value = _read_message(report_r)
        if kind == "X":
            raise LaunchError(
                f"axnet run: cannot execute {args[0]!r}: {os.strerror(value)}",
                exit_code=127 if value == errno.ENOENT else 126,
            )
        if kind != "":
            raise LaunchError(f"axnet run: launcher protocol error ({kind!r})")
        return Launched(pid=pid, pidfd=pidfd, notify=NotifyFd(notify_fd))
    except BaseException:
        for fd in (ack_w, notify_fd, pidfd):
            if fd >= 0:
                os.close(fd)
        _reap(pid)
        raise
    finally:
        os.close(report_r)


def _unreadable(program: str, path: str) -> str | None:
    """Where exec would find *program*, if it may be executed but not read:
    the kernel makes such a process non-dumpable, which bars the supervisor
    (``pidfd_getfd`` and ``/proc/PID/mem`` need ptrace access to it), unless
    fs.suid_dumpable is 1."""
    if _suid_dumpable() == 1:
        return None
    found = _found(program, path)
    return None if found is None or os.access(found, os.R_OK) else found


#: Errors after which execvp(3) tries the next directory of PATH (glibc's
#: list); after any other it gives up.
_TRY_NEXT = frozenset({errno.ENOENT, errno.ESTALE, errno.ENOTDIR, errno.ENODEV, errno.ETIMEDOUT})


def _execvp(args: list[str], environ: dict[str, str]) -> None:  # pragma: no cover - child
    """Exec *args* as glibc's execvp(3) does (env and nohup use it): a file
    the kernel cannot run (no ``#!`` line) runs in the shell, there and then,
    and a file that may not be executed (EACCES) does not end the search.
    Python's ``os.execvpe`` goes on past the first and ends at the second."""
    program = args[0]
    if "/" in program:
        candidates = [program]
    else:
        path = environ.get("PATH", os.defpath).split(os.pathsep)
        candidates = [os.path.join(d, program) if d else program for d in path]
    denied, last = False, OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    for candidate in candidates:
        try:
            try:
                os.execve(candidate, args, environ)
            except OSError as e:
                if e.errno != errno.ENOEXEC:
                    raise
                os.execve(_SHELL, [_SHELL, candidate, *args[1:]], environ)
        except OSError as e:
            if e.errno == errno.EACCES:
                denied = True
            elif e.errno not in _TRY_NEXT:
                raise
            last = e
    if denied:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    raise last


def _found(program: str, path: str) -> str | None:
    """The file exec would run for *program*: the first executable one on *path*."""
    dirs = [""] if "/" in program else path.split(os.pathsep)
    for directory in dirs:
        candidate = os.path.join(directory, program) if directory else program
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _suid_dumpable() -> int:
    try:
        with open("/proc/sys/fs/suid_dumpable", "rb") as setting:
            return int(setting.read())
    except (OSError, ValueError):
        return 0  # the default


def _filter_refused(program: str, err: int) -> str:
    """What to tell a user whose app the kernel would not filter."""
    if err == errno.EBUSY:
        # A listener filter in the chain already: the kernel allows one.
        return (
            f"axnet run: cannot intercept {program!r}: axnet run already runs under a "
            "seccomp supervisor (an axnet run inside another, or another such tool), and "
            "the kernel allows one; run it outside that (an app under axnet run reaches "
            "virtual addresses already)"
        )
    return f"axnet run: cannot install the seccomp filter: {os.strerror(err)}"


def _read_message(fd: int) -> tuple[str, int]:
    """One `<kind><int>\\n` line from the child; ("", 0) at EOF."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            if line:
                raise LaunchError("axnet run: launcher protocol error (truncated report)")
            return "", 0
        line += chunk
        if len(line) > _MAX_REPORT:
            raise LaunchError("axnet run: launcher protocol error (report too long)")
    kind, digits = line[:1].decode("ascii", "replace"), line[1:-1]
    if not digits.isdigit():
        raise LaunchError("axnet run: launcher protocol error (bad report)")
    return kind, int(digits)


def _reap(pid: int) -> None:
    """Kill and wait for a child we are abandoning (it may still wait on the ack)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _child(
    args: list[str],
    environ: dict[str, str],
    program: bytes,
    report_w: int,
    ack_r: int,
    sigmask: Iterable[int] | None,
) -> None:  # pragma: no cover - runs in the forked child
    code = EXIT_CANNOT_EXECUTE
    try:
        # Without its supervisor every trapped call of the app would fail:
        # if the supervisor dies (even by SIGKILL), the app goes with it.
        parent = os.getppid()
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:
            return  # it died before the line above
        try:
            listener = install_filter(program)
        except OSError as e:
            os.write(report_w, b"S%d\n" % (e.errno or errno.EINVAL))
            return
        os.write(report_w, b"F%d\n" % listener)
        if os.read(ack_r, 1) != b"1":
            return  # the parent gave up
        os.close(listener)
        os.close(ack_r)
        # Python ignores SIGPIPE and SIGXFSZ; exec keeps "ignored", so restore
        # the defaults the application expects (as subprocess does).  SIGINT
        # too: a Ctrl-C that waited in the mask must end this child as it
        # would the app, not raise KeyboardInterrupt here (exit 127).
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        if sigmask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
        if environ.get("LISTEN_PID") == str(parent):
            # Socket activation (sd_listen_fds(3)): the fds were passed to
            # `axnet run`, for the program it runs, which is this process.
            environ["LISTEN_PID"] = str(os.getpid())
        try:
            _execvp(args, environ)
        except OSError as e:
            os.write(report_w, b"X%d\n" % (e.errno or errno.ENOEXEC))
    except BaseException:
        code = EXIT_CANNOT_EXECUTE
    finally:
        os._exit(code)
