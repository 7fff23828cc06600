"""Probes for what test hosts need: each returns None, or why a test must skip.

Tests never assume a feature: they ask one of these functions and skip with
the returned reason (``require(can_make_netns())`` in the tests' conftest).
Probes that start a process cache their answer for the life of the test run.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys

# Where Debian puts administration programs; a non-login root shell or a nox
# session may not have the sbin directories on PATH.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The Debian package that ships each program the test hosts use; ./quickstart
# installs them.
DEBIAN_PACKAGE = {
    "ip": "iproute2",
    "nft": "nftables",
    "setpriv": "util-linux",
    "curl": "curl",
    "socat": "socat",
    "iperf3": "iperf3",
    "nginx": "nginx-light",
    "redis-server": "redis-server",
    "busybox": "busybox-static",
    "gcc": "gcc",
}

PROBE_TIMEOUT = 10.0  # seconds for one probe command; a probe never hangs a test run


def find_program(name: str) -> str | None:
    """The absolute path of program *name*, from PATH or the system directories."""
    return shutil.which(name) or shutil.which(name, path=SYSTEM_PATH)


def has_program(name: str) -> str | None:
    """None when program *name* is installed, else a reason naming its package."""
    if find_program(name) is not None:
        return None
    package = DEBIAN_PACKAGE.get(name)
    where = f" (Debian package {package}; ./quickstart installs it)" if package else ""
    return f"program {name!r} is not installed{where}"


@functools.cache
def can_make_netns() -> str | None:
    """None when this process can build network-namespace test hosts."""
    if os.geteuid() != 0:
        return f"network-namespace test hosts need root (euid is {os.geteuid()})"
    if reason := has_program("ip"):
        return reason
    ip = find_program("ip")
    assert ip is not None
    name = f"axt-{os.getpid()}-probe"
    try:
        add = subprocess.run(
            [ip, "netns", "add", name],
            check=False,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"`ip netns add {name}` did not finish in {PROBE_TIMEOUT} s"
    if add.returncode != 0:
        return f"`ip netns add` failed: {add.stderr.strip() or add.returncode}"
    subprocess.run(
        [ip, "netns", "del", name],
        check=False,
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT,
    )
    return None


@functools.cache
def can_run_as_nobody() -> str | None:
    """None when the user ``nobody`` can run this interpreter and import axnet.

    A test process that is not root is already an ordinary user and runs
    everything as itself, so the answer is None.  As root, the answer depends
    on where the virtual environment lives: one under a 0700 directory (a
    checkout or venv in /root) is unusable by ``nobody``.
    """
    if os.geteuid() != 0:
        return None
    if reason := has_program("setpriv"):
        return reason
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "there is no user named 'nobody'"
    # Imported here, not at the top: _hosts imports this module.
    from ._hosts import TestUser

    nobody = TestUser.nobody()
    argv = nobody.wrap([sys.executable, "-c", "import axnet, os; print(os.getuid())"])
    try:
        done = subprocess.run(
            argv,
            env=nobody.env(),
            check=False,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"{sys.executable} did not start as nobody within {PROBE_TIMEOUT} s"
    if done.returncode != 0 or done.stdout.strip() != str(nobody.uid):
        detail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return (
            f"nobody cannot run {sys.executable} and import axnet ({detail[0]}); "
            "the environment must be world-readable: run the tests through nox, "
            "which puts it under /opt/axnet/nox when root"
        )
    return None
