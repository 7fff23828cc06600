"""Convergence of the swim core in simulation, at 10 to 10 000 members.

For each cluster size N (LAN config, 2 ms +-1 ms links, no loss), starting
from a converged cluster (`SimNet.bootstrap`):

* broadcast: virtual time until every member delivered one new user broadcast;
* failure: virtual time from a crash until every member marks it dead, with
  the memberlist suspicion bounds for N (min = mult * max(1, log10 N) * probe
  interval, max = 6 * min);
* traffic: datagrams and bytes per member per virtual second;
* wall time of the whole run.

Compared with Serf's published convergence (200 ms gossip, fanout 3: 99.99 %
of members in 2.2 s at 1 000, 2.6 s at 10 000).

    python -m bench.sim_convergence [--sizes 10,100,1000,10000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from swim import Config, Event, MemberDead, MemberState, UserMessage, suspicion_timeout
from swim.testing import SimNet

from . import write_results

SERF_REFERENCE = {1000: 2.2, 10000: 2.6}  # seconds to 99.99 %, serf.io convergence simulator


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(n: int, seed: int) -> dict[str, Any]:
    wall = time.perf_counter()
    config = Config.lan()
    got_broadcast: dict[str, float] = {}
    saw_dead: dict[str, float] = {}
    victim = "m1"

    def observe(now: float, name: str, event: Event) -> None:
        match event:
            case UserMessage(payload=b"bench"):
                got_broadcast.setdefault(name, now)
            case MemberDead(member=member) if member.name == victim:
                saw_dead.setdefault(name, now)
            case _:
                pass

    net = SimNet(rng=random.Random(seed), config=config, observer=observe, record=False)
    for i in range(n):
        net.add(f"m{i}")
    net.bootstrap()
    net.run_for(2.0)  # let probes and timers settle

    # Broadcast convergence.
    start = net.now
    net["m0"].broadcast(b"bench", b"bench")
    sent0 = sum(net[x].stats.packets_sent for x in net.names)
    bytes0 = sum(net[x].stats.bytes_sent for x in net.names)
    ok = net.run_until(lambda: len(got_broadcast) >= n - 1, 30.0, check_every=0.01)
    delays = [t - start for t in got_broadcast.values()]
    broadcast_all = max(delays) if ok else None
    broadcast_9999 = _percentile(delays, 0.9999) if delays else None
    span = net.now - start
    packets = sum(net[x].stats.packets_sent for x in net.names) - sent0
    sent_bytes = sum(net[x].stats.bytes_sent for x in net.names) - bytes0

    # Failure detection.
    net.run_for(1.0)
    crash_at = net.now
    net.crash(victim)
    minimum = suspicion_timeout(config.suspicion_mult, n, config.probe_interval)
    limit = config.suspicion_max_timeout_mult * minimum + 30.0
    ok_dead = net.run_until(lambda: len(saw_dead) >= n - 1, limit, check_every=0.1)
    dead_delays = [t - crash_at for t in saw_dead.values()]
    false_dead = (
        sum(
            1
            for x in net.running()
            for m in net[x].members()
            if m.name != victim and m.state is MemberState.DEAD
        )
        if n <= 1000
        else None
    )

    return {
        "members": n,
        "seed": seed,
        "broadcast_all_s": broadcast_all,
        "broadcast_p9999_s": broadcast_9999,
        "broadcast_delivered": len(got_broadcast),
        "broadcast_packets_per_member_per_s": packets / n / span if span else None,
        "broadcast_bytes_per_member_per_s": sent_bytes / n / span if span else None,
        "dead_all_s": max(dead_delays) if ok_dead else None,
        "dead_first_s": min(dead_delays) if dead_delays else None,
        "dead_marked_by": len(saw_dead),
        "suspicion_min_s": minimum,
        "suspicion_max_s": config.suspicion_max_timeout_mult * minimum,
        "false_dead_views": false_dead,
        "serf_reference_s": SERF_REFERENCE.get(n),
        "wall_s": time.perf_counter() - wall,
    }


def _markdown(rows: list[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = [
        "# swim convergence (simulated, LAN config)",
        "",
        "| N | broadcast all (s) | p99.99 (s) | Serf 99.99 % (s) | pkts/member/s | bytes/member/s "
        "| crash→all dead (s) | suspicion min..max (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['members']} | {f(r['broadcast_all_s'])} | {f(r['broadcast_p9999_s'])} "
            f"| {f(r['serf_reference_s'])} | {f(r['broadcast_packets_per_member_per_s'])} "
            f"| {f(r['broadcast_bytes_per_member_per_s'])} | {f(r['dead_all_s'])} "
            f"| {f(r['suspicion_min_s'])}..{f(r['suspicion_max_s'])} | {f(r['wall_s'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        row = run(n, args.seed)
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_results(Path(args.out), "sim_convergence", rows, _markdown(rows))


if __name__ == "__main__":
    main()
