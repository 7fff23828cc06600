"""Orchestrates ``axnet demo``: everything it starts, it stops."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .._control import ControlClient, ControlError, control_path

SERVERS = (("web-a", "10.1.0.5"), ("web-b", "10.1.0.6"))
CLIENT_IP = "10.1.0.7"
#: Seconds the demo waits for its daemon and servers to come up.
STARTUP_TIMEOUT_S = 15.0


def _axnet(runtime: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "axnet", args[0], "--runtime-dir", str(runtime), *args[1:]]


def _app(*args: str) -> list[str]:
    return [sys.executable, "-m", "axnet.demo._apps", *args]


def _wait_for(what: str, predicate: Any, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args!r} exited with {proc.returncode}")
        try:
            if predicate():
                return
        except ControlError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {STARTUP_TIMEOUT_S:.0f} s")


def _services(runtime: Path) -> list[dict[str, Any]]:
    with ControlClient(control_path(runtime), timeout=2) as client:
        services: list[dict[str, Any]] = client.request("services")["services"]
        return services


def run_demo(*, verbose: int = 0, as_json: bool = False) -> int:
    runtime = Path(tempfile.mkdtemp(prefix="axnet-demo-"))
    logs = runtime / "logs"
    logs.mkdir()
    started: list[subprocess.Popen[bytes]] = []
    daemon: subprocess.Popen[bytes] | None = None
    verbosity = ["-v"] * verbose
    try:
        with open(logs / "daemon.log", "wb") as log:
            daemon = subprocess.Popen(
                _axnet(runtime, "daemon", "--name", "demo", *verbosity), stderr=log
            )
        _wait_for(
            "daemon",
            lambda: control_path(runtime).exists() and _services(runtime) is not None,
            [daemon],
        )
        for name, ip in SERVERS:
            with open(logs / f"{name}.log", "wb") as log:
                started.append(
                    subprocess.Popen(
                        _axnet(
                            runtime,
                            "run",
                            "--ip",
                            ip,
                            "--name",
                            name,
                            "--label",
                            "tier=web",
                            *verbosity,
                            "--",
                            *_app("serve", name),
                        ),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        _wait_for(
            "web servers", lambda: len(_services(runtime)) >= len(SERVERS), [daemon, *started]
        )
        services = _services(runtime)
        fetches = []
        for _, ip in SERVERS:
            done = subprocess.run(
                _axnet(
                    runtime,
                    "run",
                    "--ip",
                    CLIENT_IP,
                    "--label",
                    "tier=client",
                    *verbosity,
                    "--",
                    *_app("fetch", ip),
                ),
                capture_output=True,
                timeout=30,
                check=False,
            )
            if done.returncode != 0:
                sys.stderr.write(done.stderr.decode(errors="replace"))
                raise RuntimeError(f"the client could not fetch from {ip} (exit {done.returncode})")
            fetches.append(
                {"target": ip, **json.loads(done.stdout.decode().strip().splitlines()[-1])}
            )
        report = {"services": services, "fetches": fetches}
        if as_json:
            json.dump(report, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            _print_report(report)
        return 0
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
        print(f"axnet demo: {exc}; logs kept in {logs}", file=sys.stderr)
        for path in sorted(logs.iterdir()):
            sys.stderr.write(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}\n")
        logs = Path()
        return 1
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(timeout=5)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        if logs != Path():
            shutil.rmtree(runtime, ignore_errors=True)


def _addr(pair: list[Any]) -> str:
    return f"{pair[0]}:{pair[1]}"


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if os.geteuid() == 0:
        who, no = (
            "run as root here, which axnet does not need (an ordinary user gets the same)",
            "No",
        )
    else:
        who, no = "run by an ordinary user", "No root, no"
    console.print(
        "[bold]axnet demo[/bold]: two unmodified servers both listen on port 80, each on its own "
        f"virtual IP, {who}; a client reaches each by that IP.\n"
        f"{no} network namespace, no proxy: after connect, bytes flow on a plain kernel socket."
    )
    services = Table(title="services published (virtual → real)", title_justify="left")
    for column in ("virtual", "real", "name", "labels"):
        services.add_column(column)
    for s in report["services"]:
        labels = ",".join(f"{k}={v}" for k, v in s["labels"].items())
        services.add_row(Text(s["virtual"]), Text(s["real"]), Text(s["name"]), Text(labels))
    console.print(services)
    seen = Table(title="what each side saw", title_justify="left")
    for column in ("", "client's socket", "server's socket"):
        seen.add_column(column)
    for f in report["fetches"]:
        r = f["response"]
        seen.add_row(
            Text(f"GET http://{f['target']}/ → {r['server']}"),
            Text(
                f"getsockname {_addr(f['client_sockname'])}\n"
                f"getpeername {_addr(f['client_peername'])}"
            ),
            Text(
                f"getsockname {_addr(r['server_sockname'])}\naccept peer {_addr(r['accepted_from'])}"
            ),
        )
    console.print(seen)
    console.print("Every app and the daemon this demo started have been stopped.")
