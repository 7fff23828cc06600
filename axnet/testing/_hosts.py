"""Test hosts: network namespaces built as root, with ordinary users running inside.

Theory of operation
-------------------
axnet promises that nothing it does needs privilege, so its tests run the
daemon, the supervisor and the applications as an ordinary user (``nobody``)
and keep root for one job: building the hosts those processes run on.

* A host is a network namespace named ``axt-<pid>-<seq>-<label>``, where
  ``pid`` is the test process that made it.  It starts with ``lo`` up and
  nothing else, and no host ever gets a default route: an application that
  uses virtual IPs runs in one, so a bug in interception can put a packet for
  a virtual IP nowhere but on ``lo`` or the test's own links.
* A cluster is ``n`` hosts plus a *hub* namespace holding a bridge ``br0``.
  Every veth pair is created inside the hub with its peer moved straight into
  the host (``ip -n HUB link add vhI type veth peer name eth0 netns HOST``),
  so the root namespace's network is never modified.  Host ``i`` has
  ``10.203.0.(10+i)/24`` on ``eth0``; that subnet exists only on the bridge.
* Faults are nftables rules in each host's own ``inet axt_faults`` table, on
  the input hook and only for packets arriving on ``eth0``: a partition drops
  a peer's packets at both ends, loss drops a random share.  Dropping on input
  rather than output matters: a packet dropped on output fails the sender's
  ``sendmsg`` with EPERM, which a real network never does.  The table is
  rewritten whole in one ``nft -f`` transaction (``table …; delete table …;
  table … { … }`` is the idempotent replace idiom).
* Processes are started as ``ip netns exec NS setpriv --reuid … -- argv``.
  Both ``ip netns exec`` and ``setpriv`` exec rather than fork, so the Popen
  pid is the program's own pid.  The environment is built explicitly
  (:meth:`TestUser.env`) and handed through: ``setpriv --reset-env`` would
  drop every variable but TERM, including ``AXNET_RUNTIME_DIR``.  The working
  directory defaults to ``/``, so a Python program run as ``nobody`` imports
  axnet from the installed environment, never from a checkout that happens to
  be its working directory.  No ``--pdeathsig``: the kernel sends it when the
  parent *thread* exits, and trio starts processes from worker threads that
  exit when idle.
* Closing a host kills every process whose network namespace is the host's
  (``ip netns pids``; this catches daemons that double-forked) until none is
  left, reaps the ones this process started, then deletes the namespace.
  Closing is idempotent and cleans up as much as it can before reporting a
  failure.
* Leftovers: the test process can make itself a child subreaper, so any
  process a test started, however it daemonized, stays its descendant and
  :func:`find_leftovers` sees it at the end of the run.  Namespaces are named
  after the pid of the test run that made them, so :func:`cleanup_stale`
  removes only those of runs that are no longer alive; test runs in parallel
  on one machine do not disturb each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import os
import pwd
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import attrs

from ._probe import SYSTEM_PATH, find_program

NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts namespace handles
NAME_PREFIX = "axt-"
CLUSTER_SUBNET = ipaddress.IPv4Network("10.203.0.0/24")
FIRST_HOST_OFFSET = 10  # host i has address CLUSTER_SUBNET[FIRST_HOST_OFFSET + i]
MAX_CLUSTER_HOSTS = 200  # keeps every host address inside CLUSTER_SUBNET
HOST_INTERFACE = "eth0"
BRIDGE = "br0"
FAULTS_TABLE = "axt_faults"
ADMIN_TIMEOUT = 10.0  # seconds for one `ip` or `nft` command
KILL_TIMEOUT = 10.0  # seconds to wait for a namespace's processes to die
KILL_POLL = 0.01  # seconds between checks while they die

_LABEL = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")
_OWN_NAME = re.compile(rf"{NAME_PREFIX}(\d+)-")
_sequence = itertools.count(1)
_open_namespaces: set[str] = set()  # made by this process and not yet deleted

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


class HostError(RuntimeError):
    """A command that builds, changes or removes a test host failed."""


def _program(name: str) -> str:
    path = find_program(name)
    if path is None:
        raise HostError(f"program {name!r} is not installed")
    return path


def _admin(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """Run an administration command as root; its stdout, or HostError."""
    argv = [_program(argv[0]), *argv[1:]]
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            check=False,
            capture_output=True,
            text=True,
            timeout=ADMIN_TIMEOUT,
            env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
        )
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{' '.join(argv)} did not finish in {ADMIN_TIMEOUT} s") from exc
    if done.returncode != 0:
        raise HostError(
            f"{' '.join(argv)} failed with status {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


@attrs.frozen(kw_only=True)
class TestUser:
    """A user that tests run programs as: ``nobody``, or root for host chores."""

    __test__: ClassVar[bool] = False  # not a pytest test class despite the name

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def from_passwd(cls, name: str) -> TestUser:
        """The user *name* as the password database describes it."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ValueError(f"there is no user named {name!r}") from None
        return cls(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)

    @classmethod
    def nobody(cls) -> TestUser:
        """The ordinary user that the daemon, the supervisor and apps run as."""
        return cls.from_passwd("nobody")

    @classmethod
    def root(cls) -> TestUser:
        """Root, for the few commands that build or inspect a host."""
        return cls(name="root", uid=0, gid=0, home="/root")

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """*argv* made to run as this user.

        A test process that is not root is already an ordinary user and runs
        everything as itself; asking it for root is a ValueError.
        """
        if not argv:
            raise ValueError("argv must name a program, got []")
        if os.geteuid() != 0:
            if self.uid == 0:
                raise ValueError("cannot run a program as root: the test process is not root")
            return list(argv)
        if self.uid == 0:
            return list(argv)
        return [
            _program("setpriv"),
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            *argv,
        ]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A minimal environment for this user, plus *extra*.

        PATH starts with the directory of the test's interpreter, so ``axnet``
        and ``python`` are the installed project's.  Nothing else leaks from
        the test process (no PYTHONPATH, no HOME of root).
        """
        env = {
            "PATH": f"{Path(sys.executable).parent}:{SYSTEM_PATH}",
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "LANG": "C.UTF-8",
        }
        if extra:
            env.update(extra)
        return env


def unprivileged(argv: Sequence[str]) -> list[str]:
    """*argv* made to run as ``nobody`` when the test process is root, else as is."""
    return TestUser.nobody().wrap(argv)


def shared_tmp(*, base: Path = Path("/tmp")) -> Path:
    """A new scratch directory (mode 0755) that ``nobody`` can read but not write.

    For helper scripts and data that unprivileged processes read: pytest's
    ``tmp_path`` lies under a 0700 directory when the tests run as root.  The
    caller removes it (``shutil.rmtree``).
    """
    path = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}{os.getpid()}-", dir=base))
    path.chmod(0o755)
    return path


def make_runtime_dir(base: Path, *, user: TestUser | None = None) -> Path:
    """A new directory under *base*, private to *user* (default ``nobody``).

    Owned by the user and mode 0700, for use as ``AXNET_RUNTIME_DIR``.  When
    the test process is root, *base* and its parents must be searchable by
    others (use :func:`shared_tmp`).  Paths stay short: unix socket paths are
    limited to 107 bytes.
    """
    user = user or TestUser.nobody()
    if os.geteuid() == 0 and user.uid != 0:
        for directory in (base.resolve(), *base.resolve().parents):
            if not directory.stat().st_mode & stat.S_IXOTH:
                raise ValueError(
                    f"{base} is not reachable by {user.name}: {directory} is not searchable "
                    "by others; make the base with shared_tmp()"
                )
    path = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    if os.geteuid() == 0:
        os.chown(path, user.uid, user.gid)
    path.chmod(0o700)
    return path


def _namespace_pids(name: str) -> list[int]:
    return [int(line) for line in _admin(["ip", "netns", "pids", name]).split()]


def _kill_namespace(name: str, started: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every process in namespace *name* until none is left."""
    deadline = time.monotonic() + KILL_TIMEOUT
    killed: set[int] = set()
    while pids := _namespace_pids(name):
        if time.monotonic() > deadline:
            raise HostError(f"processes {pids} in {name} survived SIGKILL for {KILL_TIMEOUT} s")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        time.sleep(KILL_POLL)
    # Dead processes no longer belong to a namespace.  Reap the ones we started
    # through their Popen (which keeps the exit status), then the orphans that a
    # subreaper adopted, so no zombie stays behind.
    for process in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=KILL_TIMEOUT)
    for pid in killed - {process.pid for process in started}:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _delete_namespace(name: str, started: Sequence[subprocess.Popen[bytes]] = ()) -> None:
    try:
        _kill_namespace(name, started)
    finally:
        _admin(["ip", "netns", "del", name])
        _open_namespaces.discard(name)


class NetnsHost:
    """One test host: a network namespace with ``lo`` up and no default route.

    Make one with :meth:`create`; use it as a context manager or call
    :meth:`close`.
    """

    def __init__(self, name: str, *, label: str) -> None:
        """Wrap namespace *name*, which :meth:`create` has just made."""
        self.name = name
        self.label = label
        self.address: ipaddress.IPv4Address | None = None
        self._started: list[subprocess.Popen[bytes]] = []
        self._closed = False

    @classmethod
    def create(cls, label: str = "host") -> NetnsHost:
        """A new host; *label* (``[a-z0-9-]``, at most 20) appears in its name."""
        if not _LABEL.fullmatch(label):
            raise ValueError(f"label must match {_LABEL.pattern}, got {label!r}")
        name = f"{NAME_PREFIX}{os.getpid()}-{next(_sequence)}-{label}"
        _admin(["ip", "netns", "add", name])
        _open_namespaces.add(name)
        host = cls(name, label=label)
        try:
            host.ip("link", "set", "lo", "up")
        except BaseException:
            host.close()
            raise
        return host

    def __repr__(self) -> str:
        return f"<NetnsHost {self.name} address={self.address}>"

    def ip(self, *args: str) -> str:
        """Run ``ip -n NAME args`` as root; its output."""
        return _admin(["ip", "-n", self.name, *args])

    def nft(self, script: str) -> str:
        """Run the nftables *script* in this host, as root, in one transaction."""
        return _admin(["ip", "netns", "exec", self.name, "nft", "-f", "-"], stdin=script)

    def _argv(self, argv: Sequence[str], user: TestUser | None) -> list[str]:
        if self._closed:
            raise ValueError(f"{self.name} is closed")
        wrapped = (user or TestUser.nobody()).wrap(argv)
        return [_program("ip"), "netns", "exec", self.name, *wrapped]

    def popen(
        self,
        argv: Sequence[str],
        *,
        user: TestUser | None = None,
        env: Mapping[str, str] | None = None,
        stdin: int = subprocess.DEVNULL,
        stdout: Path | int = subprocess.DEVNULL,
        stderr: Path | int = subprocess.DEVNULL,
        cwd: Path | str = "/",
    ) -> subprocess.Popen[bytes]:
        """Start *argv* in this host as *user* (default ``nobody``).

        The environment is ``user.env(env)``.  *stdout* and *stderr* may be
        paths, which are created (truncated) and written by the program.
        :meth:`close` kills the program if it still runs.
        """
        full_argv = self._argv(argv, user)
        with contextlib.ExitStack() as files:
            out = files.enter_context(stdout.open("wb")) if isinstance(stdout, Path) else stdout
            err = files.enter_context(stderr.open("wb")) if isinstance(stderr, Path) else stderr
            process = subprocess.Popen(
                full_argv,
                stdin=stdin,
                stdout=out,
                stderr=err,
                env=(user or TestUser.nobody()).env(env),
                cwd=cwd,
            )
        self._started.append(process)
        return process

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        user: TestUser | None = None,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        check: bool = False,
        cwd: Path | str = "/",
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* in this host as *user* (default ``nobody``) to completion.

        Output is captured as text.  The program is killed after *timeout*
        seconds (``subprocess.TimeoutExpired``).
        """
        return subprocess.run(
            self._argv(argv, user),
            input=input,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=check,
            env=(user or TestUser.nobody()).env(env),
            cwd=cwd,
        )

    def pids(self) -> list[int]:
        """Every process now in this host's network namespace."""
        return _namespace_pids(self.name)

    def close(self) -> None:
        """Kill every process in the host, then delete it.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        _delete_namespace(self.name, self._started)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@attrs.define
class _Faults:
    blocked: set[ipaddress.IPv4Address] = attrs.Factory(set)
    loss_percent: int = 0

    def nft_script(self) -> str:
        rules: list[str] = []
        if self.blocked:
            peers = ", ".join(str(address) for address in sorted(self.blocked))
            rules.append(f'iifname "{HOST_INTERFACE}" ip saddr {{ {peers} }} drop')
        if self.loss_percent == 100:
            # nft refuses `numgen random mod 100 < 100`: the value is out of the range 0-99.
            rules.append(f'iifname "{HOST_INTERFACE}" drop')
        elif self.loss_percent:
            rules.append(
                f'iifname "{HOST_INTERFACE}" numgen random mod 100 < {self.loss_percent} drop'
            )
        body = "".join(f"        {rule}\n" for rule in rules)
        return (
            f"table inet {FAULTS_TABLE}\n"
            f"delete table inet {FAULTS_TABLE}\n"
            f"table inet {FAULTS_TABLE} {{\n"
            "    chain input {\n"
            "        type filter hook input priority filter; policy accept;\n"
            f"{body}"
            "    }\n"
            "}\n"
        )


class Cluster:
    """Hosts on one bridge, with partitions and packet loss on demand.

    ``hosts[i]`` has address ``10.203.0.(10+i)``.  Make one with
    :meth:`create` or :func:`make_hosts`; use it as a context manager or call
    :meth:`close`.
    """

    def __init__(self, hub: NetnsHost) -> None:
        """An empty cluster around *hub*; :meth:`create` fills it."""
        self.hub = hub
        self.hosts: tuple[NetnsHost, ...] = ()
        self._faults: dict[str, _Faults] = {}
        self._closed = False

    @classmethod
    def create(cls, n: int) -> Cluster:
        """A cluster of *n* hosts (1 to 200)."""
        if not 1 <= n <= MAX_CLUSTER_HOSTS:
            raise ValueError(f"a cluster has 1 to {MAX_CLUSTER_HOSTS} hosts, got {n}")
        cluster = cls(NetnsHost.create("hub"))
        try:
            cluster.hub.ip("link", "add", BRIDGE, "type", "bridge")
            cluster.hub.ip("link", "set", BRIDGE, "up")
            for index in range(n):
                cluster._add_host(index)
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _add_host(self, index: int) -> None:
        host = NetnsHost.create(f"h{index}")
        self.hosts = (*self.hosts, host)
        port = f"vh{index}"
        self.hub.ip(
            "link", "add", port, "type", "veth", "peer", "name", HOST_INTERFACE, "netns", host.name
        )
        self.hub.ip("link", "set", port, "master", BRIDGE, "up")
        address = CLUSTER_SUBNET[FIRST_HOST_OFFSET + index]
        host.ip("addr", "add", f"{address}/{CLUSTER_SUBNET.prefixlen}", "dev", HOST_INTERFACE)
        host.ip("link", "set", HOST_INTERFACE, "up")
        host.address = address
        self._faults[host.name] = _Faults()

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, index: int) -> NetnsHost:
        return self.hosts[index]

    def __iter__(self) -> Iterator[NetnsHost]:
        return iter(self.hosts)

    def _member(self, host: NetnsHost) -> tuple[_Faults, ipaddress.IPv4Address]:
        faults = self._faults.get(host.name)
        if faults is None or host.address is None or self._closed:
            raise ValueError(f"{host!r} is not a host of this open cluster")
        return faults, host.address

    def partition(self, a: NetnsHost, b: NetnsHost) -> None:
        """Drop every packet between hosts *a* and *b*, both ways, until :meth:`heal`."""
        faults_a, address_a = self._member(a)
        faults_b, address_b = self._member(b)
        if a is b:
            raise ValueError(f"cannot partition {a!r} from itself")
        faults_a.blocked.add(address_b)
        faults_b.blocked.add(address_a)
        a.nft(faults_a.nft_script())
        b.nft(faults_b.nft_script())

    def loss(self, host: NetnsHost, percent: int) -> None:
        """Drop *percent* % of the packets arriving at *host*, at random; 0 stops it."""
        faults, _ = self._member(host)
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be 0 to 100, got {percent}")
        faults.loss_percent = percent
        host.nft(faults.nft_script())

    def heal(self) -> None:
        """Remove every partition and every loss rule."""
        for host in self.hosts:
            faults, _ = self._member(host)
            faults.blocked.clear()
            faults.loss_percent = 0
            host.nft(faults.nft_script())

    def close(self) -> None:
        """Close every host, then the hub.  Idempotent; tries them all."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for host in (*self.hosts, self.hub):
            try:
                host.close()
            except Exception as exc:  # close the others before reporting
                errors.append(exc)
        if errors:
            raise HostError(f"closing the cluster failed: {errors}") from errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def make_hosts(n: int) -> Cluster:
    """A cluster of *n* hosts on one bridge (see :class:`Cluster`)."""
    return Cluster.create(n)


def cleanup_stale() -> list[str]:
    """Remove the ``axt-*`` namespaces of test runs that are no longer alive.

    Returns their names.  Namespaces of live test runs (this one included)
    are left alone.
    """
    if not NETNS_DIR.is_dir():
        return []
    removed: list[str] = []
    for entry in sorted(NETNS_DIR.iterdir()):
        match = _OWN_NAME.match(entry.name)
        if match is None or Path(f"/proc/{match[1]}").exists():
            continue
        _delete_namespace(entry.name)
        removed.append(entry.name)
    return removed


def become_subreaper() -> None:
    """Make this process adopt its orphaned descendants (``PR_SET_CHILD_SUBREAPER``).

    Then a process that a test started and that daemonized still shows up in
    :func:`find_leftovers`.  Orphans that die stay zombies until this process
    exits or reaps them; :func:`find_leftovers` ignores zombies.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


def _living_descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    zombies: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # pid (comm) state ppid …; comm may itself contain spaces and parentheses.
        state, ppid = text.rpartition(")")[2].split()[:2]
        pid = int(entry.name)
        children.setdefault(int(ppid), []).append(pid)
        if state in ("Z", "X"):
            zombies.add(pid)
    found: list[int] = []
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop()
        if pid not in zombies:
            found.append(pid)
        pending.extend(children.get(pid, []))
    return sorted(found)


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


@attrs.frozen(kw_only=True)
class Leftovers:
    """What tests left behind: namespaces of this run, living descendant processes."""

    namespaces: tuple[str, ...]
    processes: tuple[tuple[int, str], ...]  # (pid, command line) when found

    @property
    def pids(self) -> tuple[int, ...]:
        """The leftover processes' pids."""
        return tuple(pid for pid, _ in self.processes)

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.processes)

    def describe(self) -> str:
        """One line per leftover, processes with their command lines."""
        lines = [f"namespace {name}" for name in self.namespaces]
        lines += [f"process {pid}: {command}" for pid, command in self.processes]
        return "\n".join(lines)


def reap_zombie_children() -> list[int]:
    """Reap this process's dead children; their pids.

    Only for the end of a test run: it takes the exit status from any Popen
    object that has not waited for its process yet.
    """
    reaped: list[int] = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped.append(pid)
    return reaped


def find_leftovers() -> Leftovers:
    """Namespaces this process made and did not delete, and its living descendants."""
    namespaces = sorted(name for name in _open_namespaces if (NETNS_DIR / name).exists())
    processes = tuple((pid, _command_line(pid)) for pid in _living_descendants(os.getpid()))
    return Leftovers(namespaces=tuple(namespaces), processes=processes)


def remove_leftovers(leftovers: Leftovers) -> None:
    """Kill the leftover processes and delete the leftover namespaces."""
    for pid in leftovers.pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in leftovers.pids:
        with contextlib.suppress(ChildProcessError):  # not our child: init or its parent reaps
            os.waitpid(pid, 0)
    for name in leftovers.namespaces:
        _delete_namespace(name)
