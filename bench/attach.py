"""App start: what sending a new app's client port block to every member costs.

An attach is answered once the app's block has reached every member (see
``Daemon.changed``), so that servers on other nodes name the app from its
first connection.  Measured as ``axnet run`` attaches, over the control
socket: a node with no peer (nothing to send; the baseline) against a node
with PEERS members, alternating rounds, in one namespace host with every
daemon on a loopback address of its own; daemons and the measuring client run
as ``nobody``.

    python -m bench.attach [--peers K] [--count N] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from axnet.testing import AxnetNode, NetnsHost, wait_until

from . import unwind_on_sigterm, write_results
from .core import pct

#: Run by the host's ``nobody``: COUNT attaches (each on a fresh session,
#: as a new app's), their latency in ns as a JSON list.
CLIENT = """
import json, os, sys, time
from pathlib import Path
from axnet._control import ControlClient, control_path
path, count = control_path(Path(sys.argv[1])), int(sys.argv[2])
times = []
for i in range(count):
    with ControlClient(path) as client:
        started = time.perf_counter_ns()
        client.request("attach", app_id=f"bench{i}", vip=None, block=None, name="",
                       labels=[], pid=os.getpid(), argv=["bench"], claims=[])
        times.append(time.perf_counter_ns() - started)
print(json.dumps(times))
"""

ROUNDS = 6


def _node(host: NetnsHost, name: str, address: str, *join: str) -> AxnetNode:
    args = ["--name", name, "--profile", "local", "--address", address]
    args += ["--bind", f"{address}:7946", *(["--join", join[0]] if join else [])]
    return AxnetNode(host, daemon_args=args).start()


def measure(peers: int, count: int) -> dict[str, Any]:
    with NetnsHost.create("bench") as host:
        nodes: list[AxnetNode] = []
        try:
            nodes.append(_node(host, "alone", "127.0.0.1"))
            nodes.append(_node(host, "first", "127.0.0.2"))
            for index in range(peers):
                nodes.append(_node(host, f"peer{index}", f"127.0.0.{3 + index}", "127.0.0.2:7946"))
            alone, first = nodes[0], nodes[1]
            wait_until("every member alive", lambda: len(first.json("members")) == peers + 1)
            script = first.scratch / "attach.py"
            script.write_text(CLIENT)
            script.chmod(0o644)
            samples: dict[str, list[int]] = {"alone": [], "with peers": []}
            for round_ in range(ROUNDS):
                order = [("alone", alone), ("with peers", first)]
                for label, node in order if round_ % 2 == 0 else order[::-1]:
                    argv = [sys.executable, str(script), str(node.runtime), str(count)]
                    done = host.run(argv, timeout=300, check=True)
                    samples[label] += json.loads(done.stdout)
            unacked = first.json("status")["gossip"]["deliveries"]["unacked"]
        finally:
            for node in nodes:
                node.close()
    return {
        "peers": peers,
        "attaches": count * ROUNDS,
        "unacked": unacked,
        **{
            label: {"p50_us": pct(xs, 0.5), "p99_us": pct(xs, 0.99)}
            for label, xs in samples.items()
        },
    }


def summary(result: dict[str, Any]) -> str:
    alone, peers = result["alone"], result["with peers"]
    lines = [
        "# App start: a new block sent to every member",
        "",
        f"Attach latency over the control socket ({result['attaches']} attaches each, "
        f"{ROUNDS} alternating rounds): a node alone against one with {result['peers']} "
        "members, all on loopback; the block reached them before each reply "
        f"({result['unacked']} members' acks missed in all).",
        "",
        "| attach | alone | with peers | added |",
        "|---|---|---|---|",
    ]
    for key, label in (("p50_us", "p50"), ("p99_us", "p99")):
        added = peers[key] - alone[key]
        lines.append(f"| {label} | {alone[key]:.0f} µs | {peers[key]:.0f} µs | {added:+.0f} µs |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.attach", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--peers", type=int, default=4, help="members besides the node (1-200)")
    parser.add_argument("--count", type=int, default=100, help="attaches a round and node")
    args = parser.parse_args(argv)
    if not 1 <= args.peers <= 200 or not 1 <= args.count <= 10_000:
        parser.error("--peers must be 1 to 200 and --count 1 to 10000")
    unwind_on_sigterm()
    result = measure(args.peers, args.count)
    write_results(args.out, "attach", result, summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
