"""An axnet node on a test host: daemon, apps and commands, all as ``nobody``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._hosts import NetnsHost, make_runtime_dir, shared_tmp

#: The installed project's command, run by the test's (world-readable) interpreter.
AXNET = (sys.executable, "-m", "axnet")
APPS = (sys.executable, "-m", "axnet.testing.apps")
#: Seconds a test waits for something the cluster should do at once.
SETTLE_TIMEOUT_S = 15.0


def wait_until(
    what: str, predicate: Callable[[], Any], *, timeout: float = SETTLE_TIMEOUT_S
) -> Any:
    """Poll *predicate* until it returns something truthy; AssertionError after *timeout*."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not true after {timeout:.0f} s (last: {last!r})")


class AxnetNode:
    """A daemon on *host* with its own runtime directory and logs."""

    def __init__(
        self,
        host: NetnsHost,
        *,
        daemon_args: Sequence[str] = (),
        daemon_wrap: Sequence[str] = (),
    ) -> None:
        """*daemon_wrap* goes before ``axnet daemon`` (``prlimit …``); it
        must exec the daemon, keeping its pid."""
        self.host = host
        self.scratch = shared_tmp()
        self.runtime = make_runtime_dir(self.scratch)
        self.logs = self.scratch / "logs"
        self.logs.mkdir(mode=0o777)
        self.logs.chmod(0o777)
        self.daemon_args = list(daemon_args)
        self.daemon_wrap = list(daemon_wrap)
        self.daemon: subprocess.Popen[bytes] | None = None
        self._apps = 0
        self._starts = 0
        self.env = {"AXNET_RUNTIME_DIR": str(self.runtime)}

    # -- daemon --------------------------------------------------------------

    def start(self) -> AxnetNode:
        return self.launch().wait_ready()

    def launch(self) -> AxnetNode:
        """Start the daemon without waiting for it (see :meth:`wait_ready`)."""
        self._starts += 1
        # A restarted daemon logs to a new file: daemon.log, daemon-2.log, …
        suffix = "" if self._starts == 1 else f"-{self._starts}"
        self.daemon = self.host.popen(
            [*self.daemon_wrap, *AXNET, "daemon", "-v", *self.daemon_args],
            env=self.env,
            stderr=self.logs / f"daemon{suffix}.log",
        )
        return self

    def wait_ready(self) -> AxnetNode:
        """Wait until the daemon :meth:`launch` started answers."""
        assert self.daemon is not None
        wait_until(
            "daemon answers",
            lambda: self.axnet("status", check=False).returncode == 0 or self._daemon_died(),
        )
        if self.daemon.poll() is not None:
            raise AssertionError(f"daemon exited: {self.log('daemon')}")
        return self

    def _daemon_died(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is not None

    def kill_daemon(self) -> None:
        assert self.daemon is not None
        # setpriv/ip netns exec keep the pid: the Popen is the daemon itself.
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(timeout=10)

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def close(self) -> None:
        self.stop()
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- commands and apps --------------------------------------------------------

    def axnet(
        self, *args: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = self.host.run([*AXNET, *args], env=self.env, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(
                f"axnet {' '.join(args)} failed ({done.returncode}): {done.stderr}"
            )
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.axnet(*args, "--json").stdout)

    def services(self) -> dict[str, dict[str, Any]]:
        return {s["virtual"]: s for s in self.json("services")}

    def axnet_cmd(self) -> list[str]:
        return list(AXNET)

    def run_cmd_prefix(
        self, *, ip: str | None = None, name: str = "", labels: Sequence[str] = ()
    ) -> list[str]:
        """``axnet run FLAGS --``: prefix a program with it."""
        return [*AXNET, "run", *self.run_flags(ip, name, labels), "--"]

    def run_flags(self, ip: str | None, name: str, labels: Sequence[str]) -> list[str]:
        flags = ["-v"]
        if ip:
            flags += ["--ip", ip]
        if name:
            flags += ["--name", name]
        for label in labels:
            flags += ["--label", label]
        return flags

    def app(
        self,
        argv: Sequence[str],
        *,
        ip: str | None = None,
        name: str = "",
        labels: Sequence[str] = (),
        cwd: Path | str = "/",
        wrap: Sequence[str] = (),
        flags: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start *argv* under ``axnet run`` in the background; output in ``logs``.

        *wrap* goes before ``axnet run`` (``taskset -c 0``, say), so that it
        holds for the supervisor and the app alike; *flags* are more of
        ``axnet run``'s own.
        """
        self._apps += 1
        tag = f"app{self._apps}"
        return self.host.popen(
            [*wrap, *AXNET, "run", *self.run_flags(ip, name, labels), *flags, "--", *argv],
            env=self.env,
            stdout=self.logs / f"{tag}.out",
            stderr=self.logs / f"{tag}.err",
            cwd=cwd,
        )

    def run(
        self,
        argv: Sequence[str],
        *,
        ip: str | None = None,
        name: str = "",
        labels: Sequence[str] = (),
        timeout: float = 60,
        wrap: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* under ``axnet run`` to completion; output captured.  *wrap*: as in :meth:`app`."""
        return self.host.run(
            [*wrap, *AXNET, "run", *self.run_flags(ip, name, labels), "--", *argv],
            env=self.env,
            timeout=timeout,
        )

    def run_json(self, argv: Sequence[str], **kwargs: Any) -> Any:
        done = self.run(argv, **kwargs)
        if done.returncode != 0:
            raise AssertionError(f"{argv} exited {done.returncode}: {done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def wait_service(self, virtual: str, *, timeout: float = SETTLE_TIMEOUT_S) -> dict[str, Any]:
        result: dict[str, Any] = wait_until(
            f"service {virtual} published", lambda: self.services().get(virtual), timeout=timeout
        )
        return result

    def log(self, name: str) -> str:
        out = []
        for path in sorted(self.logs.glob(f"{name}*")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def all_logs(self) -> str:
        return self.log("")


def gossip_daemon_args(
    host: NetnsHost,
    name: str,
    *,
    seed: NetnsHost | None = None,
    profile: str = "local",
    key_file: Path | None = None,
    port: int = 7946,
) -> list[str]:
    """``axnet daemon`` flags for a cluster member on *host*, joining through *seed*."""
    assert host.address is not None, f"{host!r} is not a cluster host"
    args = ["--name", name, "--advertise", f"{host.address}:{port}", "--profile", profile]
    args += ["--bind", f"0.0.0.0:{port}"]
    if seed is not None:
        args += ["--join", f"{seed.address}:{port}"]
    if key_file is not None:
        args += ["--gossip-key-file", str(key_file)]
    return args


def cpu_ns(pid: int) -> int:
    """CPU time all of *pid*'s threads have had so far, in ns (0 once it is gone)."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 10) -> int:
    """SIGTERM, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
