"""The test hosts themselves: isolation, users, links, faults and cleanup."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from axnet.testing import (
    Cluster,
    NetnsHost,
    TestUser,
    can_make_netns,
    cleanup_stale,
    find_leftovers,
    has_program,
    make_hosts,
    make_runtime_dir,
    unprivileged,
)

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, usable by any user
PORT = 8080
READY_TIMEOUT = 10.0  # seconds for a server in a fresh host to answer


def _curl(host: NetnsHost, url: str, *, max_time: float = 30.0) -> subprocess.CompletedProcess[str]:
    """A request expected to succeed gets room; one expected to time out
    passes a short *max_time*."""
    argv = ["curl", "--silent", "--show-error", "--connect-timeout", str(min(max_time, 10))]
    return host.run([*argv, "--max-time", str(max_time), url], timeout=max_time + 5)


def _wait_until(ready: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _serve(server: NetnsHost, scratch: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An HTTP server run by nobody on *server*, and the URL of its test file."""
    (scratch / "hello.txt").write_text("hello from a namespace\n")
    assert server.address is not None
    process = server.popen(
        [SYSTEM_PYTHON, "-m", "http.server", str(PORT), "--bind", str(server.address)],
        cwd=scratch,
        stderr=scratch / "server.log",
    )
    return process, f"http://{server.address}:{PORT}/hello.txt"


def test_unprivileged_drops_to_nobody_only_when_root() -> None:
    argv = unprivileged(["axnet", "run", "--", "app"])
    assert argv[-4:] == ["axnet", "run", "--", "app"]
    if os.geteuid() == 0:
        assert argv[0].endswith("/setpriv")
        assert "--reuid=65534" in argv
        assert "--reset-env" not in argv  # it would drop AXNET_RUNTIME_DIR and friends
    else:
        assert argv == ["axnet", "run", "--", "app"]


def test_user_environment_is_minimal_and_explicit() -> None:
    env = TestUser.nobody().env({"AXNET_RUNTIME_DIR": "/tmp/x"})
    assert env["AXNET_RUNTIME_DIR"] == "/tmp/x"
    assert env["USER"] == "nobody"
    assert env["HOME"] != "/root"
    assert "PYTHONPATH" not in env
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_wrap_rejects_an_empty_argv() -> None:
    with pytest.raises(ValueError, match=r"argv must name a program, got \[\]"):
        TestUser.nobody().wrap([])


def test_probes_name_their_reason() -> None:
    assert has_program("sh") is None
    reason = has_program("no-such-program-axnet")
    assert reason is not None and "no-such-program-axnet" in reason
    if os.geteuid() != 0:
        assert "root" in str(can_make_netns())


def test_scratch_dir_is_readable_by_everyone(scratch_dir: Path) -> None:
    assert stat.S_IMODE(scratch_dir.stat().st_mode) == 0o755


def test_runtime_dir_is_private_to_nobody(runtime_dir: Path) -> None:
    info = runtime_dir.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700
    if os.geteuid() == 0:
        assert (info.st_uid, info.st_gid) == (65534, TestUser.nobody().gid)
    assert len(str(runtime_dir)) < 60  # room for socket names within 107 bytes


def test_runtime_dir_refuses_a_base_nobody_cannot_reach(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root's tmp_path is out of nobody's reach")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="not searchable by others"):
        make_runtime_dir(private)


@pytest.mark.netns
def test_a_host_has_only_loopback_and_no_route(netns_host: NetnsHost) -> None:
    links = netns_host.ip("-o", "link", "show").splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    assert netns_host.ip("-4", "route", "show").strip() == ""
    for family in ("-4", "-6"):
        assert netns_host.ip(family, "route", "show", "default", "table", "all").strip() == ""
    assert netns_host.name in os.listdir("/run/netns")


@pytest.mark.netns
def test_processes_in_a_host_run_as_nobody(netns_host: NetnsHost, runtime_dir: Path) -> None:
    done = netns_host.run(
        [
            SYSTEM_PYTHON,
            "-c",
            "import os; print(os.getuid(), os.getgid(), os.getgroups(), os.getcwd(),"
            " os.environ['AXNET_RUNTIME_DIR'],"
            " [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1])",
        ],
        env={"AXNET_RUNTIME_DIR": str(runtime_dir)},
        timeout=10,
        check=True,
    )
    nobody = TestUser.nobody()
    assert done.stdout.split() == [
        "65534",
        str(nobody.gid),
        "[]",
        "/",
        str(runtime_dir),
        "0000000000000000",
    ]
    writes = netns_host.run(["/bin/sh", "-c", f"touch {runtime_dir}/ok"], timeout=10)
    assert writes.returncode == 0, writes.stderr


@pytest.mark.netns
def test_root_runs_in_a_host_only_when_asked(netns_host: NetnsHost) -> None:
    done = netns_host.run(["id", "-u"], user=TestUser.root(), timeout=10, check=True)
    assert done.stdout.strip() == "0"


@pytest.mark.netns
def test_two_hosts_of_a_cluster_reach_each_other(
    cluster: Callable[[int], Cluster], scratch_dir: Path
) -> None:
    hosts = cluster(2)
    assert [str(host.address) for host in hosts] == ["10.203.0.10", "10.203.0.11"]
    for host in hosts:
        assert host.ip("-4", "route", "show").split()[0] == "10.203.0.0/24"
        assert host.ip("route", "show", "default", "table", "all").strip() == ""
    server, url = _serve(hosts[0], scratch_dir)
    _wait_until(
        lambda: _curl(hosts[1], url).returncode == 0, timeout=READY_TIMEOUT, what="HTTP answer"
    )
    assert _curl(hosts[1], url).stdout == "hello from a namespace\n"
    assert server.poll() is None
    assert server.pid in hosts[0].pids()


@pytest.mark.netns
def test_partition_blocks_then_heal_restores(
    cluster: Callable[[int], Cluster], scratch_dir: Path
) -> None:
    hosts = cluster(3)
    _, url = _serve(hosts[0], scratch_dir)
    _wait_until(
        lambda: _curl(hosts[1], url).returncode == 0, timeout=READY_TIMEOUT, what="HTTP answer"
    )
    hosts.partition(hosts[0], hosts[1])
    blocked = _curl(hosts[1], url, max_time=1.5)
    assert blocked.returncode == 28, blocked.stderr  # curl: operation timed out
    assert _curl(hosts[2], url).returncode == 0  # the third host still reaches both
    hosts.heal()
    assert _curl(hosts[1], url).returncode == 0


@pytest.mark.netns
def test_loss_installs_a_random_drop_rule(
    cluster: Callable[[int], Cluster], scratch_dir: Path
) -> None:
    hosts = cluster(2)
    _, url = _serve(hosts[0], scratch_dir)
    _wait_until(
        lambda: _curl(hosts[1], url).returncode == 0, timeout=READY_TIMEOUT, what="HTTP answer"
    )
    hosts.loss(hosts[0], 30)
    rules = hosts[0].run(
        ["nft", "list", "table", "inet", "axt_faults"], user=TestUser.root(), timeout=10
    )
    assert 'iifname "eth0" numgen random mod 100 < 30 drop' in rules.stdout
    hosts.loss(hosts[0], 100)
    assert _curl(hosts[1], url, max_time=1.5).returncode == 28
    hosts.loss(hosts[0], 0)
    assert _curl(hosts[1], url).returncode == 0
    with pytest.raises(ValueError, match="percent must be 0 to 100, got 101"):
        hosts.loss(hosts[0], 101)


@pytest.mark.netns
def test_close_leaves_no_namespace_and_no_process(require: Callable[[str | None], None]) -> None:
    require(can_make_netns())
    hosts = make_hosts(2)
    names = [hosts.hub.name, *(host.name for host in hosts)]
    sleeper = hosts[0].popen(["sleep", "600"])
    # A daemon that leaves its parent behind: only the namespace still finds it.
    hosts[1].run(["/bin/sh", "-c", "setsid sleep 600 >/dev/null 2>&1 &"], timeout=10, check=True)
    daemons = hosts[1].pids()
    assert len(daemons) == 1
    hosts.close()
    hosts.close()  # idempotent
    assert sleeper.returncode == -9
    assert not _alive(daemons[0])
    assert not set(names) & set(os.listdir("/run/netns"))
    assert not set(names) & set(find_leftovers().namespaces)
    with pytest.raises(ValueError, match="is closed"):
        hosts[0].popen(["true"])


@pytest.mark.netns
def test_cleanup_stale_removes_only_dead_runs(netns_host: NetnsHost) -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    stale = f"axt-{pid_max + 1}-1-stale"  # no process can have that pid
    ip = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    assert ip is not None
    subprocess.run([ip, "netns", "add", stale], check=True, timeout=10)
    removed = cleanup_stale()
    assert stale in removed  # with any other dead run's, on a shared machine
    assert all(not Path(f"/proc/{name.split('-')[1]}").exists() for name in removed)
    assert netns_host.name in os.listdir("/run/netns")
