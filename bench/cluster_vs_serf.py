"""axnet's gossip next to HashiCorp Serf, on real namespace hosts, in one run.

    python -m bench.cluster_vs_serf --nodes 8 [--idle 20] [--out bench/results]

N test hosts on one bridge (``axnet.testing.Cluster``, root builds them), each
running one ``axnet daemon --profile lan`` (gossip port 7946) and one
``serf agent -profile lan`` (port 7947), both as ``nobody``.  Serf's agent
uses memberlist's LAN defaults, which ``--profile lan`` copies: probe 1 s,
timeout 500 ms, gossip 200 ms to 3, suspicion multiplier 4, push-pull 30 s.

Measured, for each system, with one observer for both:

* join convergence: every non-seed member is told to join host 1 at the same
  instant (through its already-open control session, resp. Serf RPC, so no
  CLI start-up is timed); time until every member lists all N alive;
* failure detection: the last host's daemon and agent are killed with
  SIGKILL at the same instant; time until every other member lists it dead
  (failed); repeated for ``--kills`` hosts one after the other, median;
* idle traffic: bytes per second per node leaving each host on the system's
  port (nftables counters, IP headers included) over an idle window;
* idle CPU: utime + stime from /proc/PID/stat of every daemon and agent over
  the same window, as % of one core.

The observer (this file run with ``--observe``) runs as ``nobody`` in the
bridge's namespace and polls every member every ``POLL_S``: axnet over the
unix control socket, Serf over its msgpack RPC.  It is paused during the idle
window so that it costs the daemons nothing there.  Ratios are axnet ÷ serf.

Network rules: only the namespace hosts this run creates are contacted;
every wait is bounded; everything is removed at the end (also on failure).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from . import write_results

AXNET_PORT = 7946
SERF_PORT = 7947
SERF_RPC_PORT = 7373
#: Seconds between two polls of one member by the observer.
POLL_S = 0.05
#: Longest wait for a phase (start, join, detection), seconds.
PHASE_TIMEOUT_S = 120.0
#: Seconds left to settle after convergence, before the idle window.
SETTLE_S = 5.0
OBSERVER_ADDRESS = "10.203.0.250"
SERF = "/usr/bin/serf"
SERF_DEAD = ("failed", "left")
AXNET_DEAD = ("dead", "left")


# -- observer (runs as nobody in the hub namespace) ------------------------------------


class SerfRPC:
    """The few Serf RPC commands we need (msgpack header, then body)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self._sock = socket.create_connection(address, timeout=5)
        self._unpacker = msgpack.Unpacker(raw=True)
        self._seq = 0
        self._call("handshake", {"Version": 1}, body=False)

    def _send(self, obj: object) -> None:
        self._sock.sendall(msgpack.packb(obj, use_bin_type=False))

    def _next(self) -> Any:
        while True:
            for obj in self._unpacker:
                return obj
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("serf closed the RPC connection")
            self._unpacker.feed(data)

    def _call(self, command: str, args: object | None, *, body: bool) -> Any:
        self._seq += 1
        self._send({"Command": command, "Seq": self._seq})
        if args is not None:
            self._send(args)
        header = self._next()
        error = header.get(b"Error", b"")
        if error:
            raise RuntimeError(f"serf {command}: {error!r}")
        return self._next() if body else None

    def members(self) -> dict[str, str]:
        reply = self._call("members", None, body=True)
        return {m[b"Name"].decode(): m[b"Status"].decode() for m in reply[b"Members"]}

    def join(self, seed: str) -> int:
        reply = self._call("join", {"Existing": [seed], "Replay": False}, body=True)
        return int(reply[b"Num"])


def observe(config_path: str, out_path: str) -> None:
    """Poll every member of both systems; one JSON line per changed view."""
    from axnet._control import ControlClient  # only in observer mode

    config = json.loads(Path(config_path).read_text())
    nodes = config["nodes"]
    out = Path(out_path).open("a")  # noqa: SIM115  # lives as long as the observer

    def emit(**fields: Any) -> None:
        out.write(json.dumps({"t": time.time(), **fields}) + "\n")
        out.flush()

    axnet: dict[str, Any] = {}
    serf: dict[str, SerfRPC] = {}
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while len(axnet) < len(nodes) or len(serf) < len(nodes):
        for node in nodes:
            try:
                if node["name"] not in axnet:
                    axnet[node["name"]] = ControlClient(Path(node["control"]), timeout=5)
                if node["name"] not in serf:
                    serf[node["name"]] = SerfRPC((node["ip"], SERF_RPC_PORT))
            except Exception:  # not up yet
                continue
        if time.monotonic() > deadline:
            emit(event="error", reason="members did not come up")
            return
        time.sleep(0.1)
    emit(event="ready")
    last: dict[tuple[str, str], dict[str, str]] = {}
    paused = False
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if readable:
            command = sys.stdin.readline().split()
            if not command or command[0] == "quit":
                return
            if command[0] == "pause":
                paused = True
            elif command[0] == "resume":
                paused = False
            elif command[0] == "join":
                system, seed = command[1], command[2]
                emit(event="join-sent", sys=system)
                for node in nodes[1:]:
                    if system == "axnet":
                        axnet[node["name"]].request("join", seeds=[f"{seed}:{AXNET_PORT}"])
                    else:
                        serf[node["name"]].join(f"{seed}:{SERF_PORT}")
                emit(event="join-done", sys=system)
        if paused:
            continue
        for node in nodes:
            name = node["name"]
            for system in ("axnet", "serf"):
                try:
                    if system == "axnet":
                        members = axnet[name].request("members")["members"]
                        view = {m["name"]: m["status"] for m in members}
                    else:
                        view = serf[name].members()
                except Exception:  # killed member: stop asking it
                    continue
                if last.get((name, system)) != view:
                    last[(name, system)] = view
                    emit(node=name, sys=system, view=view)


# -- the benchmark (runs as root) -------------------------------------------------------


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


COUNTERS = f"""
table inet axb_count
delete table inet axb_count
table inet axb_count {{
    counter axnet_out {{ }}
    counter serf_out {{ }}
    chain output {{
        type filter hook output priority filter; policy accept;
        meta l4proto {{ tcp, udp }} th sport {AXNET_PORT} counter name "axnet_out" accept
        meta l4proto {{ tcp, udp }} th dport {AXNET_PORT} counter name "axnet_out" accept
        meta l4proto {{ tcp, udp }} th sport {SERF_PORT} counter name "serf_out" accept
        meta l4proto {{ tcp, udp }} th dport {SERF_PORT} counter name "serf_out" accept
    }}
}}
"""


def _out_bytes(host: Any) -> dict[str, int]:
    from axnet.testing import TestUser

    done = host.run(
        ["nft", "-j", "list", "counters", "table", "inet", "axb_count"],
        user=TestUser.root(),
        timeout=10,
        check=True,
    )
    found: dict[str, int] = {}
    for item in json.loads(done.stdout)["nftables"]:
        counter = item.get("counter")
        if counter:
            found[counter["name"].split("_")[0]] = int(counter["bytes"])
    return found


class Observations:
    """The observer's lines, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[dict[str, Any]] = []
        self._offset = 0

    def poll(self) -> None:
        with self.path.open() as f:
            f.seek(self._offset)
            for line in f:
                if line.endswith("\n"):
                    self.lines.append(json.loads(line))
                    self._offset += len(line.encode())

    def wait(self, what: str, predicate: Any) -> Any:
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while time.monotonic() < deadline:
            self.poll()
            result = predicate()
            if result is not None:
                return result
            time.sleep(0.05)
        raise TimeoutError(f"{what}: not done after {PHASE_TIMEOUT_S} s")

    def event(self, name: str, system: str | None = None) -> dict[str, Any] | None:
        for line in self.lines:
            if line.get("event") == name and (system is None or line.get("sys") == system):
                return line
        return None

    def first_time_all(self, system: str, since: float, nodes: list[str], test: Any) -> Any:
        """Latest over *nodes* of the first time (≥ since) that *test* held for its view."""
        firsts: dict[str, float] = {}
        current: dict[str, dict[str, str]] = {}
        for line in self.lines:
            if line.get("sys") != system or "view" not in line:
                continue
            current[line["node"]] = line["view"]
            fresh = line["t"] >= since and line["node"] in nodes and line["node"] not in firsts
            if fresh and test(line["view"]):
                firsts[line["node"]] = line["t"]
        # A node whose view already passed before `since` counts at `since`.
        for node in nodes:
            if node not in firsts and node in current and test(current[node]):
                firsts[node] = max(since, firsts.get(node, since))
        if len(firsts) < len(nodes):
            return None
        return max(firsts.values()) - since


def run(n: int, idle_s: float, kills: int) -> dict[str, Any]:
    from axnet.testing import (  # root-only helpers
        AXNET,
        AxnetNode,
        make_hosts,
        shared_tmp,
    )

    cluster = make_hosts(n)
    scratch = shared_tmp()
    nodes: list[AxnetNode] = []
    serfs: list[subprocess.Popen[bytes]] = []
    observer: subprocess.Popen[bytes] | None = None
    try:
        cluster.hub.ip("addr", "add", f"{OBSERVER_ADDRESS}/24", "dev", "br0")
        for host in cluster:
            host.nft(COUNTERS)
        names = [f"h{i + 1}" for i in range(n)]
        for name, host in zip(names, cluster, strict=True):
            node = AxnetNode(
                host,
                daemon_args=[
                    "--name",
                    name,
                    "--bind",
                    f"{host.address}:{AXNET_PORT}",
                    "--profile",
                    "lan",
                ],
            )
            nodes.append(node.launch())
            serfs.append(
                host.popen(
                    [
                        SERF,
                        "agent",
                        f"-node={name}",
                        f"-bind={host.address}:{SERF_PORT}",
                        f"-advertise={host.address}:{SERF_PORT}",
                        f"-rpc-addr={host.address}:{SERF_RPC_PORT}",
                        "-profile=lan",
                        "-log-level=warn",
                    ],
                    stderr=scratch / f"serf-{name}.log",
                )
            )
        for node in nodes:
            node.wait_ready()
        config = scratch / "observer.json"
        observed_nodes = [
            {"name": name, "ip": str(host.address), "control": str(node.runtime / "control.sock")}
            for name, host, node in zip(names, cluster, nodes, strict=True)
        ]
        config.write_text(json.dumps({"nodes": observed_nodes}))
        config.chmod(0o644)
        out = scratch / "observed.jsonl"
        out.touch()
        out.chmod(0o666)
        observer = cluster.hub.popen(
            [AXNET[0], str(Path(__file__).resolve()), "--observe", str(config), str(out)],
            stdin=subprocess.PIPE,
            stderr=scratch / "observer.log",
        )
        seen = Observations(out)
        seen.wait("observer ready", lambda: seen.event("ready") or seen.event("error"))
        if seen.event("error"):
            raise RuntimeError(f"observer: {seen.event('error')}")

        def command(text: str) -> None:
            assert observer is not None and observer.stdin is not None
            observer.stdin.write(text.encode() + b"\n")
            observer.stdin.flush()

        results: dict[str, Any] = {"nodes": n, "idle_window_s": idle_s}
        seed = str(cluster[0].address)
        for system, alive in (("serf", "alive"), ("axnet", "alive")):
            command(f"join {system} {seed}")
            sent = seen.wait(f"{system} join sent", lambda s=system: seen.event("join-sent", s))
            took = seen.wait(
                f"{system} converged",
                lambda s=system, t=sent["t"], a=alive: seen.first_time_all(
                    s,
                    t,
                    names,
                    lambda view: len(view) == n and all(v == a for v in view.values()),
                ),
            )
            results.setdefault(system, {})["join_convergence_s"] = round(took, 3)

        time.sleep(SETTLE_S)
        command("pause")
        time.sleep(0.5)
        pids = {
            "axnet": [node.daemon.pid for node in nodes if node.daemon is not None],
            "serf": [proc.pid for proc in serfs],
        }
        cpu0 = {s: [_cpu_ticks(p) for p in ps] for s, ps in pids.items()}
        bytes0 = [_out_bytes(host) for host in cluster]
        start = time.monotonic()
        time.sleep(idle_s)
        elapsed = time.monotonic() - start
        cpu1 = {s: [_cpu_ticks(p) for p in ps] for s, ps in pids.items()}
        bytes1 = [_out_bytes(host) for host in cluster]
        ticks = os.sysconf("SC_CLK_TCK")
        for system in ("axnet", "serf"):
            per_node = [
                100.0 * (b - a) / ticks / elapsed
                for a, b in zip(cpu0[system], cpu1[system], strict=True)
            ]
            sent_bytes = sum(b1[system] - b0[system] for b0, b1 in zip(bytes0, bytes1, strict=True))
            results[system]["idle_cpu_percent_per_node_mean"] = round(sum(per_node) / n, 3)
            results[system]["idle_cpu_percent_per_node_max"] = round(max(per_node), 3)
            results[system]["idle_bytes_per_s_per_node"] = round(sent_bytes / elapsed / n, 1)
        rss = [
            int(line.split()[1])
            for pid in pids["axnet"]
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        ]
        results["axnet"]["rss_mib_per_node_mean"] = round(sum(rss) / len(rss) / 1024, 1)
        command("resume")
        time.sleep(1.0)

        # Crashes one after the other (the last hosts), each timed on its own.
        detections: dict[str, list[float]] = {"axnet": [], "serf": []}
        for k in range(kills):
            index = n - 1 - k
            victim = names[index]
            killed_at = time.time()
            nodes[index].kill_daemon()
            serfs[index].send_signal(signal.SIGKILL)
            serfs[index].wait(timeout=10)
            survivors = names[:index]
            for system, dead in (("serf", SERF_DEAD), ("axnet", AXNET_DEAD)):
                took = seen.wait(
                    f"{system} detected the crash of {victim}",
                    lambda s=system, d=dead, v=victim, t=killed_at, a=survivors: (
                        seen.first_time_all(s, t, a, lambda view: view.get(v) in d)
                    ),
                )
                detections[system].append(round(took, 3))
        for system, values in detections.items():
            results[system]["failure_detection_s"] = statistics.median(values)
            results[system]["failure_detection_each_s"] = values
        command("quit")
        observer.wait(timeout=10)
        ratios: dict[str, float | None] = {}
        for key in (
            "join_convergence_s",
            "failure_detection_s",
            "idle_bytes_per_s_per_node",
            "idle_cpu_percent_per_node_mean",
        ):
            a, s = results["axnet"][key], results["serf"][key]
            ratios[key] = round(a / s, 2) if s else None
        results["ratio_axnet_over_serf"] = ratios
        return results
    finally:
        if observer is not None and observer.poll() is None:
            observer.kill()
            observer.wait()
        for node in nodes:
            node.close()
        for proc in serfs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cluster.close()
        shutil.rmtree(scratch, ignore_errors=True)


def markdown(all_results: list[dict[str, Any]]) -> str:
    lines = [
        "# axnet gossip vs Serf on namespace hosts",
        "",
        "Same run, same hosts, both as `nobody`, LAN timings (probe 1 s, gossip 200 ms "
        "to 3, suspicion ×4). Ratios are axnet ÷ serf (lower is better for axnet).",
        "",
        "| N | metric | axnet | serf | axnet ÷ serf |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in all_results:
        for key, label in (
            ("join_convergence_s", "join convergence (s)"),
            ("failure_detection_s", "failure detection after kill -9, median (s)"),
            ("idle_bytes_per_s_per_node", "idle bytes/s sent per node"),
            ("idle_cpu_percent_per_node_mean", "idle CPU per node (% of a core)"),
        ):
            lines.append(
                f"| {r['nodes']} | {label} | {r['axnet'][key]} | {r['serf'][key]} | "
                f"{r['ratio_axnet_over_serf'][key]} |"
            )
        lines.append(
            f"| {r['nodes']} | axnet RSS per daemon (MiB) | "
            f"{r['axnet']['rss_mib_per_node_mean']} | | |"
        )
    lines += [
        "",
        "Idle window: "
        + ", ".join(f"{r['idle_window_s']} s at N={r['nodes']}" for r in all_results)
        + ". Bytes are IP packets leaving each host on the system's port.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_vs_serf")
    parser.add_argument("--nodes", type=int, action="append", help="cluster size (repeatable)")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window, seconds")
    parser.add_argument("--kills", type=int, default=3, help="crashes timed, one by one")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--observe", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.observe:
        observe(*args.observe)
        return 0
    from bench import unwind_on_sigterm  # not in observer mode: run as a script there

    unwind_on_sigterm()
    if os.geteuid() != 0:
        print("cluster_vs_serf: needs root to build namespace hosts", file=sys.stderr)
        return 2
    if not Path(SERF).exists():
        print(f"cluster_vs_serf: {SERF} is missing (apt-get install serf)", file=sys.stderr)
        return 2
    sizes = args.nodes or [8]
    all_results = []
    for n in sizes:
        started = time.monotonic()
        result = run(n, args.idle, min(args.kills, n - 2))
        result["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(result, indent=1), flush=True)
        all_results.append(result)
    write_results(args.out, "cluster_vs_serf", all_results, markdown(all_results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
