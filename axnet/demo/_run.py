"""Orchestrates ``axnet demo``: a local cluster; everything it starts, it stops.

Three nodes, one daemon each, as three hosts would have them: each on a
loopback address of its own (127.0.0.11 to .13), gossiping (encrypted) with
the others.  A web server on port 80 runs on each of the first two nodes at a
virtual IP; a client on the third fetches from both, by those IPs.  Then the
second node leaves the cluster, and the third sees its service go.

SIGTERM and SIGHUP stop it as Ctrl-C does: what it started is stopped and its
scratch directory (with the gossip key) removed, then it ends by that signal.
Under ``timeout`` or a closing terminal its children get the signal as well:
the demo still waits for each and removes the directory, logs included (a
child that the signal ended is no failure to keep them for).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import attrs

from .._control import ControlClient, ControlError, control_path
from ..intercept._libc import set_parent_death_signal

#: Seconds the demo waits at most for each step (daemons up, members agreed,
#: a service seen everywhere, a departure seen).  Each takes well under a
#: second on a quiet machine; the bound is for a loaded one (at a load of
#: 12 on two CPUs, 20 s was once too short for three daemons to agree).
STEP_TIMEOUT_S = 60.0
#: Signals that stop the demo, beside Ctrl-C (`Stopped`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@attrs.frozen
class DemoNode:
    name: str
    address: str
    runtime: Path

    def control(self) -> ControlClient:
        return ControlClient(control_path(self.runtime), timeout=2)

    def listing(self, what: str) -> list[dict[str, Any]]:
        with self.control() as client:
            rows: list[dict[str, Any]] = client.request(what)[what]
            return rows


NODES = (("node-a", "127.0.0.11"), ("node-b", "127.0.0.12"), ("node-c", "127.0.0.13"))
#: (name, virtual IP, index of the node it runs on)
SERVERS = (("web-a", "10.1.0.5", 0), ("web-b", "10.1.0.6", 1))
CLIENT_IP, CLIENT_NODE = "10.1.0.7", 2
LEAVING = 1  # node-b
#: Every node's virtual range: a connect into it that no service answers is
#: refused at once, never routed to a real network.
VIRTUAL_RANGE = "10.1.0.0/24"


def _stop_with_the_demo() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when the demo dies, however
    it dies (SIGKILL, the OOM killer), and so stops cleanly, as the demo
    would have stopped it; never left running for good.  (The demo starts
    no thread: a ``preexec_fn`` is safe here.)"""
    demo = os.getpid()

    def preexec() -> None:
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != demo:  # it died before that took hold
            os._exit(1)

    return preexec


def _axnet(node: DemoNode, *args: str) -> list[str]:
    return [sys.executable, "-m", "axnet", args[0], "--runtime-dir", str(node.runtime), *args[1:]]


def _app_on(node: DemoNode, ip: str, label: str, app: list[str], *flags: str) -> list[str]:
    """``axnet run --ip IP --label LABEL FLAGS -- python -m axnet.demo._apps APP…`` on *node*."""
    run = _axnet(node, "run", "--ip", ip, "--label", label, *flags, "--")
    return [*run, sys.executable, "-m", "axnet.demo._apps", *app]


class _Progress:
    """Lines on stderr as the demo goes (the report comes at the end)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"axnet demo: {text} ({elapsed:.1f} s)", file=sys.stderr, flush=True)


def _wait_for(
    what: str,
    predicate: Callable[[], Any],
    procs: list[subprocess.Popen[bytes]],
    progress: _Progress,
) -> Any:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args!r} exited with {proc.returncode}")
        try:
            if result := predicate():
                progress(what)
                return result
        except ControlError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not after {STEP_TIMEOUT_S:.0f} s")


def _agreed(nodes: list[DemoNode]) -> bool:
    everyone = {node.name: "alive" for node in nodes}
    return all(
        control_path(node.runtime).exists() and _statuses(node) == everyone for node in nodes
    )


def _gossip_address(node: DemoNode) -> str:
    with node.control() as client:
        address: str = client.request("status")["gossip"]["advertise"]
        return address


def _statuses(node: DemoNode) -> dict[str, str]:
    return {m["name"]: m["status"] for m in node.listing("members")}


def _virtuals(node: DemoNode) -> set[str]:
    return {s["virtual"] for s in node.listing("services")}


def _client(node: DemoNode, targets: list[str], verbosity: list[str]) -> list[dict[str, Any]]:
    """A client app on *node*, started now, that fetches from each target in
    turn: its daemon has sent its client port block to every node before it
    runs, so the servers name it from its first connection."""
    proc = subprocess.run(
        _app_on(node, CLIENT_IP, "tier=client", ["fetch", *targets], *verbosity),
        capture_output=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
        preexec_fn=_stop_with_the_demo(),
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace"))
        raise RuntimeError(f"the client exited with {proc.returncode}")
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


class Stopped(BaseException):
    """One of STOP_SIGNALS came: raised where the demo is, so that it stops
    what it started (a BaseException, as KeyboardInterrupt is: no failure)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: FrameType | None) -> NoReturn:
    raise Stopped(signum)


def run_demo(*, verbose: int = 0, as_json: bool = False) -> int:
    """The demo's exit status, or -N once signal N of STOP_SIGNALS stopped it
    (as ``axnet run`` reports its app's signal): by then everything it
    started has stopped and its scratch directory is gone."""
    # A signal ignored from the start stays so (``nohup axnet demo``).
    previous = {
        signum: signal.signal(signum, _raise_stopped)
        for signum in STOP_SIGNALS
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    scratch: Path | None = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix="axnet-demo-"))
        return _demo(scratch, verbose=verbose, as_json=as_json)
    except Stopped as stopped:
        if scratch is not None:  # its logs too: what stopped it is no failure
            shutil.rmtree(scratch, ignore_errors=True)
        return -stopped.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _demo(scratch: Path, *, verbose: int, as_json: bool) -> int:
    progress = _Progress()
    logs = scratch / "logs"
    logs.mkdir()
    daemons: list[subprocess.Popen[bytes]] = []
    apps: list[subprocess.Popen[bytes]] = []
    verbosity = ["-v"] * verbose
    keep_logs = False
    try:
        key = scratch / "gossip.key"
        key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        key.chmod(0o600)
        nodes = [DemoNode(name, address, scratch / name) for name, address in NODES]
        progress(f"starting {len(nodes)} nodes, on {nodes[0].address} to {nodes[-1].address}")
        seed = ""
        for node in nodes:
            node.runtime.mkdir(mode=0o700)
            gossip = f"{node.address}:0"  # the daemon takes a port free for UDP and TCP
            args = ["--name", node.name, "--bind", gossip, "--advertise", gossip]
            args += ["--profile", "local", "--gossip-key-file", str(key)]
            # Its log is shown only if the demo fails: then it should say why.
            args += ["--virtual-range", VIRTUAL_RANGE, *(verbosity or ["-v"])]
            args += ["--join", seed] if seed else []
            with open(logs / f"{node.name}.log", "wb") as log:
                daemons.append(
                    subprocess.Popen(
                        _axnet(node, "daemon", *args),
                        stderr=log,
                        preexec_fn=_stop_with_the_demo(),  # noqa: PLW1509 (no threads)
                    )
                )
            if not seed:  # the others join through the first, at the port it took
                seed = _wait_for(
                    f"{node.name} gossips", lambda: _gossip_address(nodes[0]), daemons, progress
                )
        _wait_for("every node sees every member alive", lambda: _agreed(nodes), daemons, progress)

        for name, ip, where in SERVERS:
            node = nodes[where]
            with open(logs / f"{name}.log", "wb") as log:
                apps.append(
                    subprocess.Popen(
                        _app_on(node, ip, "tier=web", ["serve", name], "--name", name, *verbosity),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        preexec_fn=_stop_with_the_demo(),  # noqa: PLW1509 (no threads)
                    )
                )
        client_node = nodes[CLIENT_NODE]
        every_service = {f"{ip}:80" for _, ip, _ in SERVERS}
        _wait_for(
            f"{client_node.name} knows both web servers",
            lambda: _virtuals(client_node) >= every_service,
            [*daemons, *apps],
            progress,
        )
        report: dict[str, Any] = {
            "nodes": [{"name": n.name, "address": n.address} for n in nodes],
            "seen_from": client_node.name,
            "members": client_node.listing("members"),
            "services": client_node.listing("services"),
            "fetches": _client(client_node, [ip for _, ip, _ in SERVERS], verbosity),
        }
        progress(f"a client on {client_node.name} fetched from both")

        leaving = nodes[LEAVING]
        with leaving.control() as client:
            client.request("leave")
        gone = {f"{ip}:80" for _, ip, where in SERVERS if where == LEAVING}
        _wait_for(
            f"{client_node.name} sees {leaving.name} leave and its services go",
            lambda: (
                _statuses(client_node).get(leaving.name) == "left"
                and not _virtuals(client_node) & gone
            ),
            daemons,
            progress,
        )
        report["after_leave"] = {
            "node": leaving.name,
            "members": client_node.listing("members"),
            "services": client_node.listing("services"),
            "fetches": _client(client_node, [ip.split(":")[0] for ip in sorted(gone)], verbosity),
        }
        progress("stopping everything it started")
        if as_json:
            json.dump(report, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            _print_report(report)
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError, ControlError) as exc:
        keep_logs = True
        print(f"axnet demo: {exc}; logs kept in {logs}", file=sys.stderr)
        for path in sorted(logs.iterdir()):
            sys.stderr.write(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}\n")
        return 1
    finally:
        for signum in STOP_SIGNALS:  # a second one does not cut the stopping short
            signal.signal(signum, signal.SIG_IGN)
        _stop_all([*apps, *daemons])
        if not keep_logs:
            shutil.rmtree(scratch, ignore_errors=True)
    if not as_json:
        print("Every app and daemon this demo started has been stopped.")
    return 0


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each, then SIGKILL what is left after 5 s (apps first, daemons last)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    who = (
        "run as root here, which axnet does not need (an ordinary user gets the same)"
        if os.geteuid() == 0
        else "run by an ordinary user"
    )
    first, last = report["nodes"][0]["address"], report["nodes"][-1]["address"]
    seen_from = report["seen_from"]
    console.print(
        f"[bold]axnet demo[/bold]: a local cluster of {len(report['nodes'])} nodes, {who}: "
        f"one daemon each, on loopback addresses {first} to {last} as if on "
        "three hosts, gossiping (encrypted) their members and services. Two unmodified "
        "web servers listen on port 80, each on its own virtual IP and node; a client "
        f"on {seen_from} reaches each by that IP. No root, no network namespace, no "
        "proxy: after connect, bytes flow on a plain kernel socket."
    )
    console.print(_members_table(report["members"], f"members, as {seen_from} sees them"))
    console.print(_services_table(report["services"], f"services, as {seen_from} sees them"))
    seen = Table(title="what each side saw", title_justify="left")
    for column in ("", "client's socket", "server's socket"):
        seen.add_column(column, overflow="fold")
    for f in report["fetches"]:
        r = f["response"]
        seen.add_row(
            Text(f"GET http://{f['target']}/ → {r['server']}"),
            Text(f"getsockname {f['client_sockname']}\ngetpeername {f['client_peername']}"),
            Text(f"getsockname {r['server_sockname']}\naccept peer {r['accepted_from']}"),
        )
    console.print(seen)
    after = report["after_leave"]
    console.print(f"Then {after['node']} left the cluster ('axnet leave'). {seen_from} sees:")
    console.print(_members_table(after["members"], "members"))
    console.print(_services_table(after["services"], "services"))
    for f in after["fetches"]:
        outcome = f.get("error") or "answered (its service should have gone)"
        console.print(Text(f"GET http://{f['target']}/ → {outcome}, after {f['ms']} ms"))


def _members_table(members: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for column in ("name", "address", "gossip", "status"):
        table.add_column(column, overflow="fold")
    for m in members:
        table.add_row(Text(m["name"]), Text(m["address"]), Text(m["gossip"]), Text(m["status"]))
    return table


def _services_table(services: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{title} (virtual → real)", title_justify="left")
    for column in ("virtual", "real", "node", "name", "labels"):
        table.add_column(column, overflow="fold")
    for s in services:
        labels = ",".join(f"{k}={v}" for k, v in s["labels"].items())
        table.add_row(
            Text(s["virtual"]), Text(s["real"]), Text(s["node"]), Text(s["name"]), Text(labels)
        )
    return table
