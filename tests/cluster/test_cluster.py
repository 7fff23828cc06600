"""A real cluster: one daemon per namespace host, all unprivileged, gossiping.

Hosts are numbered from 1 as in the issue: host 1 is ``nodes[0]`` (the seed,
10.203.0.10), host 5 is ``nodes[4]``.  Daemons run the ``lan`` profile
(memberlist's LAN defaults: probe 1 s, suspicion multiplier 4, push-pull 30 s).
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

from axnet.testing import APPS, AxnetNode, stop_process, wait_until

from .conftest import StartNodes

# The `lan` profile (swim.Config.lan()), spelled out so that this module
# does not import swim in the test process.
PROBE_INTERVAL_S = 1.0
SUSPICION_MULT = 4
SUSPICION_MAX_TIMEOUT_MULT = 6
PUSH_PULL_INTERVAL_S = 30.0
LOCAL_PUSH_PULL_INTERVAL_S = 15.0  # the `local` profile's

#: Latest a change (a member joined, a record) is seen everywhere. A broadcast
#: nearly always gets there within a second; a member it missed (about one
#: broadcast in 2000 with five members, in simulation) learns the change at
#: its next push-pull, at most an interval later; a few seconds more for that
#: exchange on a loaded machine.
SPREAD_S = PUSH_PULL_INTERVAL_S + 5.0


def max_detection_s(n: int) -> float:
    """Latest a crash can be declared everywhere: one probe round to notice it,
    the unconfirmed (longest) suspicion timeout, a second of gossip."""
    minimum = SUSPICION_MULT * max(1.0, math.log10(n)) * PROBE_INTERVAL_S
    return n * PROBE_INTERVAL_S + SUSPICION_MAX_TIMEOUT_MULT * minimum + 1.0


def statuses(node: AxnetNode) -> dict[str, str]:
    return {m["name"]: m["status"] for m in node.json("members")}


def all_see(nodes: list[AxnetNode], expected: dict[str, str]) -> list[dict[str, str]] | None:
    seen = [statuses(node) for node in nodes]
    return seen if all(view == expected for view in seen) else None


def everyone_alive(nodes: list[AxnetNode]) -> dict[str, str]:
    return {f"h{i + 1}": "alive" for i in range(len(nodes))}


def wait_agreement(nodes: list[AxnetNode]) -> None:
    wait_until(
        "members agree everywhere", lambda: all_see(nodes, everyone_alive(nodes)), timeout=SPREAD_S
    )


def serve_dir(node: AxnetNode, text: str) -> str:
    path = node.scratch / "www"
    path.mkdir()
    (path / "index.html").write_text(text)
    path.chmod(0o755)
    (path / "index.html").chmod(0o644)
    return str(path)


def gossip_stats(node: AxnetNode) -> dict[str, Any]:
    stats: dict[str, Any] = node.json("status")["gossip"]
    return stats


def test_five_hosts_agree_and_reach_a_service_by_its_virtual_ip(
    start_nodes: StartNodes, interception: None
) -> None:
    nodes = start_nodes(5)
    wait_agreement(nodes)
    for node in nodes:
        members = node.json("members")
        assert {m["name"]: m["address"] for m in members} == {
            f"h{i + 1}": str(other.host.address) for i, other in enumerate(nodes)
        }
    table = nodes[2].axnet("members")
    assert "h5" in table.stdout and "alive" in table.stdout
    # Where each member gossips: what tells two nodes of one host apart.
    assert all(m["gossip"] in table.stdout for m in nodes[2].json("members"))

    server = nodes[0].app(
        ["python3", "-m", "http.server", "80"],
        ip="10.1.0.5",
        name="web",
        cwd=serve_dir(nodes[0], "hello from host 1"),
    )
    try:
        service = nodes[4].wait_service("10.1.0.5:80", timeout=SPREAD_S)
        # Host 5 connects straight to host 1's real address.
        assert service["real"].startswith(f"{nodes[0].host.address}:")
        assert service["node"] == "h1"
        done = nodes[4].run(["curl", "-sS", "-m", "10", "http://10.1.0.5/"], timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "hello from host 1"
        # Host 5 lists the remote app with what it serves (no pid: not its own).
        (web,) = wait_until(
            "the app's record on host 5",
            lambda: [a for a in nodes[4].json("apps") if a["vip"] == "10.1.0.5"],
            timeout=SPREAD_S,
        )
        assert web["listening"] == ["10.1.0.5:80"]
        assert web["node"] == "h1" and web["pid"] is None
    finally:
        stop_process(server)
    # An app's very first connection to another host is named by its
    # virtual IP: its daemon sent its port block to every member before it
    # ran, not a gossip round later.
    greeter = nodes[0].app([*APPS, "greeter", "7000"], ip="10.1.0.6", name="greeter")
    try:
        nodes[4].wait_service("10.1.0.6:7000", timeout=SPREAD_S)
        sent = gossip_stats(nodes[4])["deliveries"]["sent"]
        named = nodes[4].run([*APPS, "names", "10.1.0.6", "7000"], ip="10.1.0.9", timeout=30)
        assert named.returncode == 0, named.stderr
        seen = json.loads(named.stdout)
        assert seen["sockname"][0] == "10.1.0.9", seen
        assert seen["server"]["accepted_from"] == seen["sockname"], seen
        # Straight to each member h5 holds alive then: all four, unless a
        # loaded machine had one suspected at that moment.
        assert sent < gossip_stats(nodes[4])["deliveries"]["sent"] <= sent + len(nodes) - 1
    finally:
        stop_process(greeter)
    # The web server is gone: its service disappears everywhere.
    wait_until(
        "service withdrawn everywhere",
        lambda: all("10.1.0.5:80" not in node.services() for node in nodes[1:]),
        timeout=SPREAD_S,
    )


def test_killed_daemon_is_dead_everywhere_then_rejoins(
    start_nodes: StartNodes, interception: None
) -> None:
    nodes = start_nodes(5)
    wait_agreement(nodes)
    app = nodes[2].app([*APPS, "greeter", "7000"], ip="10.1.0.7", name="greeter")
    others = [n for i, n in enumerate(nodes) if i != 2]
    try:
        for node in others:
            node.wait_service("10.1.0.7:7000", timeout=SPREAD_S)
        nodes[2].kill_daemon()
        dead = {**everyone_alive(nodes), "h3": "dead"}
        # How fast is the simulator's to check (virtual time, no noise); here
        # only that it happens, with room for a loaded machine.
        bound = 3 * max_detection_s(len(nodes))
        wait_until("h3 dead everywhere", lambda: all_see(others, dead), timeout=bound)
        for node in others:
            assert "10.1.0.7:7000" not in node.services()

        # Restarted: it rejoins with a higher incarnation, its app re-attaches
        # and the service comes back everywhere.
        nodes[2].start()
        wait_until(
            "h3 alive again everywhere",
            lambda: all_see(nodes, everyone_alive(nodes)),
            timeout=SPREAD_S,
        )
        for node in others:
            node.wait_service("10.1.0.7:7000", timeout=SPREAD_S)
        seen = nodes[0].json("members")
        assert [m["status"] for m in seen if m["name"] == "h3"] == ["alive"], seen
    finally:
        stop_process(app)


def test_a_daemon_restarted_under_running_apps_withdraws_none_of_their_services(
    start_nodes: StartNodes, interception: None
) -> None:
    # h2's daemon is killed and started again at once while its app runs on.
    # The app's supervisor is held stopped, so that it re-attaches only when
    # let go: meanwhile the new daemon learns the app's records back from h1
    # at its join.  Its lease says the app runs: they stay as they are (they
    # were withdrawn, and every client refused, until the app re-attached),
    # and go only once the daemon has settled without the app.
    nodes = start_nodes(2)
    wait_agreement(nodes)
    address = "10.1.0.7:7000"
    server = nodes[1].app([*APPS, "greeter", "7000"], ip="10.1.0.7", name="greeter")
    try:
        nodes[0].wait_service(address, timeout=SPREAD_S)
        server.send_signal(signal.SIGSTOP)  # the supervisor (setpriv execs it)
        nodes[1].kill_daemon()
        nodes[1].start()
        log = nodes[1].logs / "daemon-2.log"
        wait_until("h2 settled", lambda: "settled" in log.read_text())
        wait_until(
            "the service withdrawn on h1 once h2 settled",
            lambda: address not in nodes[0].services(),
            timeout=SPREAD_S,
        )
        lines = log.read_text().splitlines()
        settled = next(i for i, line in enumerate(lines) if "settled" in line)
        mentions = [(i, line) for i, line in enumerate(lines) if f"service={address}" in line]
        # Learnt from h1 as it was, then withdrawn only once h2 settled.
        assert mentions and "published" in mentions[0][1], mentions
        assert all(i > settled for i, line in mentions if "withdrawn" in line), mentions
        assert gossip_stats(nodes[1])["records"]["republished"] == 0
        server.send_signal(signal.SIGCONT)
        nodes[0].wait_service(address, timeout=SPREAD_S)
    finally:
        server.send_signal(signal.SIGCONT)
        stop_process(server)


def test_a_service_that_moves_to_another_host_is_served_from_there(
    start_nodes: StartNodes, interception: None
) -> None:
    # Each daemon numbers its records from its own start time.  A service
    # that moved to a host whose daemon started earlier had been withdrawn
    # above any version that host would write, and was never published
    # there: both directions, so one of them is that case.
    nodes = start_nodes(2)
    wait_agreement(nodes)
    address = "10.1.0.6:7000"

    def withdrawn() -> bool:
        return all(address not in node.services() for node in nodes)

    for here, there, name in ((nodes[0], nodes[1], "h2"), (nodes[1], nodes[0], "h1")):
        first = here.app([*APPS, "greeter", "7000"], ip="10.1.0.6", name="greeter")
        try:
            there.wait_service(address, timeout=SPREAD_S)
        finally:
            stop_process(first)
        wait_until("service withdrawn everywhere", withdrawn, timeout=SPREAD_S)
        moved = there.app([*APPS, "greeter", "7000"], ip="10.1.0.6", name="greeter")
        try:
            for node in nodes:
                assert node.wait_service(address, timeout=SPREAD_S)["node"] == name
            named = here.run([*APPS, "names", "10.1.0.6", "7000"], ip="10.1.0.9", timeout=30)
            assert named.returncode == 0, named.stderr
            assert json.loads(named.stdout)["server"]["accepted_from"][0] == "10.1.0.9"
        finally:
            stop_process(moved)
        wait_until("service withdrawn everywhere", withdrawn, timeout=SPREAD_S)


def test_partition_heals(start_nodes: StartNodes, interception: None) -> None:
    nodes = start_nodes(5)
    wait_agreement(nodes)
    apps = [
        nodes[0].app([*APPS, "greeter", "7001"], ip="10.1.0.11"),
        nodes[4].app([*APPS, "greeter", "7005"], ip="10.1.0.15"),
    ]
    try:
        for node in nodes:
            node.wait_service("10.1.0.11:7001", timeout=SPREAD_S)
            node.wait_service("10.1.0.15:7005", timeout=SPREAD_S)
        # Hosts 1-2 | hosts 3-5: each side declares the other dead.
        left, right = nodes[:2], nodes[2:]
        for a in left:
            for b in right:
                nodes.net.partition(a.host, b.host)
        cut = {f"h{i + 1}": ("alive" if i < 2 else "dead") for i in range(5)}
        cut_right = {f"h{i + 1}": ("dead" if i < 2 else "alive") for i in range(5)}
        # Longer than a crash: on the side that can reach almost nobody, every
        # probe and every indirect probe fails, and Lifeguard stretches that
        # side's probe interval up to 8x (awareness_max_multiplier).
        bound = 3 * max_detection_s(5)
        wait_until("left side sees the right dead", lambda: all_see(left, cut), timeout=bound)
        wait_until(
            "right side sees the left dead", lambda: all_see(right, cut_right), timeout=bound
        )
        assert "10.1.0.15:7005" not in nodes[0].services()
        assert "10.1.0.11:7001" not in nodes[4].services()

        nodes.net.heal()
        wait_until("members agree again", lambda: all_see(nodes, everyone_alive(nodes)), timeout=60)
        for node in nodes:
            node.wait_service("10.1.0.11:7001", timeout=SPREAD_S)
            node.wait_service("10.1.0.15:7005", timeout=SPREAD_S)
    finally:
        for app in apps:
            stop_process(app)


def test_wrong_gossip_key_is_refused_and_logged(start_nodes: StartNodes, key_file: Any) -> None:
    good, bad = key_file(), key_file()
    nodes = start_nodes(3, key_files=[good, good, bad])
    wait_until(
        "the two members with the cluster key agree",
        lambda: all_see(nodes[:2], {"h1": "alive", "h2": "alive"}),
    )
    # The member with another key never gets in, and it says so.
    assert statuses(nodes[2]) == {"h3": "alive"}
    joined = nodes[2].axnet("join", str(nodes[0].host.address), check=False)
    assert joined.returncode == 1
    assert "no member answered through 1 seed(s)" in joined.stderr
    assert "the same --gossip-key-file" in joined.stderr
    assert statuses(nodes[0]) == {"h1": "alive", "h2": "alive"}
    # The seed logged the refusal with the source address, and counted it.
    wait_until(
        "refusal logged",
        lambda: f"gossip refused stream from={nodes[2].host.address}:" in nodes[0].log("daemon"),
    )
    stats = gossip_stats(nodes[0])
    assert stats["streams"]["dropped_auth"] >= 1
    assert stats["encrypted"] is True


def test_join_and_leave_commands(start_nodes: StartNodes) -> None:
    nodes = start_nodes(3, join=False)
    for node in nodes:
        assert statuses(node) == {node.daemon_args[1]: "alive"}
    for node in nodes[1:]:
        done = node.axnet("join", f"{nodes[0].host.address}:7946")
        assert "joined through 1 of 1 seed(s)" in done.stdout
    wait_agreement(nodes)
    left = nodes[1].axnet("leave")
    assert left.stdout.startswith("left the cluster:") and "axnet join SEED" in left.stdout
    wait_until(
        "h2 left, everywhere",
        lambda: all_see([nodes[0], nodes[2]], {"h1": "alive", "h2": "left", "h3": "alive"}),
        timeout=SPREAD_S,
    )
    bad = nodes[0].axnet("join", "10.203.0.10:notaport", check=False)
    assert bad.returncode == 2  # a usage error, found before asking the daemon
    assert "axnet join: SEED must be HOST[:PORT], got '10.203.0.10:notaport'" in bad.stderr
    # A seed whose name does not resolve is named, with why; the others still count.
    # (No test host has a route to a name server: the lookup fails at once.)
    unknown = "axnet join: cannot resolve seed 'nosuchhost.invalid' ("
    mixed = nodes[2].axnet("join", "nosuchhost.invalid", f"{nodes[0].host.address}:7946")
    assert "joined through 1 of 2 seed(s)" in mixed.stdout
    assert unknown in mixed.stderr
    alone = nodes[2].axnet("join", "nosuchhost.invalid", check=False)
    assert alone.returncode == 1
    assert unknown in alone.stderr
    assert "no member answered" not in alone.stderr  # nothing was asked
    # A seed that is the node itself is named as such, not taken for a member.
    itself = nodes[2].axnet("join", f"{nodes[2].host.address}:7946", check=False)
    assert itself.returncode == 1
    assert f"seed '{nodes[2].host.address}:7946' is this node itself" in itself.stderr
    assert "no member answered" not in itself.stderr


def test_every_join_that_a_name_clash_stops_says_so(start_nodes: StartNodes) -> None:
    # h2 restarted under h1's name: no join of it can take effect, and each
    # says why (the first once did, and the next ones said "joined").
    nodes = start_nodes(2, join=False)
    twin = nodes[1]
    twin.stop()
    twin.daemon_args[twin.daemon_args.index("--name") + 1] = "h1"
    twin.start()
    seed = f"{nodes[0].host.address}:7946"
    clash = f"axnet join: another member uses this node's name (at {seed})"
    for _ in range(2):
        done = twin.axnet("join", seed, check=False)
        assert done.returncode == 1, done.stdout
        assert clash in done.stderr
    assert statuses(twin) == {"h1": "alive"}
    # The same after a start-up join (--join) that met the clash.
    twin.stop()
    twin.daemon_args += ["--join", seed]
    twin.start()
    wait_until("the clash logged", lambda: "another member is named h1" in twin.log("daemon-3"))
    done = twin.axnet("join", seed, check=False)
    assert done.returncode == 1, done.stdout
    assert clash in done.stderr


def test_a_daemon_started_with_a_live_members_name_does_not_leave_for_it(
    start_nodes: StartNodes,
) -> None:
    # h4 restarted under h3's name is refused; stopped (a graceful leave),
    # its leave was taken for h3's: every member marked h3 left and withdrew
    # its services, though h3 never stopped.
    nodes = start_nodes(4)
    wait_agreement(nodes)
    watchers = nodes[:2]
    twin = nodes[3]
    twin.stop()
    twin.daemon_args[twin.daemon_args.index("--name") + 1] = "h3"
    twin.start()
    wait_until("the clash logged", lambda: "another member is named h3" in twin.log("daemon-2"))
    twin.stop()  # SIGTERM: the daemon leaves the cluster
    assert "left the cluster name=h3" in twin.log("daemon-2")
    expected = {"h1": "alive", "h2": "alive", "h3": "alive", "h4": "left"}

    def taken(node: AxnetNode) -> bool:
        return "member left name=h3" in node.log("daemon")

    def leave_handled() -> bool:
        # h3 refutes such a leave within a second or two: the logs tell.
        return any(taken(node) or gossip_stats(node)["leaves_ignored"] >= 1 for node in watchers)

    wait_until("the twin's leave handled", leave_handled, timeout=SPREAD_S)
    assert not [node.host.name for node in watchers if taken(node)]
    assert all_see(watchers, expected), [statuses(node) for node in watchers]


ATTACK = r"""
import os, random, socket, struct, sys, time
from swim._messages import Ack, Ping, compound, decode_envelope, encode_message

target = sys.argv[1]
rng = random.Random(7)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(10)
sent = 0
SYNC = compound([encode_message(Ping(seq=999, target="h1", source="ghost"))])


def synced():
    # The daemon reads its socket in order: its Ack to this ping proves that
    # everything sent before it was read, not dropped by a full buffer.
    udp.sendto(SYNC, (target, 7946))
    while True:
        reply = udp.recv(65536)
        if Ack(seq=999) in decode_envelope(reply):
            return


def send(data):
    global sent
    udp.sendto(data, (target, 7946))
    sent += 1
    if sent % 20 == 0:
        synced()


ping = compound([encode_message(Ping(seq=1, target="h1", source="ghost"))])
for _ in range(300):  # random bytes, some behind a plausible version byte
    body = os.urandom(rng.randrange(1, 1400))
    if rng.random() < 0.5:
        body = bytes([rng.choice([0x01, 0x81])]) + body
    send(body)
for cut in range(1, len(ping)):  # every truncation of a valid packet
    send(ping[:cut])
for size in (1401, 9000, 65000):  # oversized
    send(b"\x01" + os.urandom(size - 1))
for _ in range(200):  # one valid packet, replayed
    send(ping)
synced()
# TCP: a stream announcing 2 GiB, then peers that stall in the middle of a
# push-pull, more of them than the daemon serves at once.
huge = socket.create_connection((target, 7946), timeout=5)
huge.sendall(struct.pack("!I", 2**31))
time.sleep(0.2)
stalled = []
for _ in range(12):
    s = socket.create_connection((target, 7946), timeout=5)
    s.sendall(struct.pack("!I", 1000) + b"\x01" * 10)
    stalled.append(s)
print("sent", sent, flush=True)
time.sleep(float(sys.argv[2]))
"""


def rss_kib(node: AxnetNode) -> int:
    assert node.daemon is not None
    for line in Path(f"/proc/{node.daemon.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_bad_input_is_counted_and_the_daemon_keeps_serving(
    start_nodes: StartNodes, interception: None
) -> None:
    # `local`: streams time out after 1 s (tcp_timeout), well within the attack.
    nodes = start_nodes(3, profile="local")
    wait_agreement(nodes)
    target = nodes[0]
    rss_before = rss_kib(target)
    attacker = nodes[2].host.popen(
        ["python3", "-c", ATTACK, str(target.host.address), "4"],
        stdout=nodes[2].logs / "attack.out",
        stderr=nodes[2].logs / "attack.err",
    )
    try:
        wait_until("attack sent", lambda: "sent" in (nodes[2].logs / "attack.out").read_text())
        # While peers stall on it, it answers and gossips a new service.
        assert statuses(target).keys() == everyone_alive(nodes).keys()
        app = target.app([*APPS, "greeter", "7009"], ip="10.1.0.9")
        try:
            nodes[1].wait_service("10.1.0.9:7009", timeout=LOCAL_PUSH_PULL_INTERVAL_S + 5.0)
        finally:
            stop_process(app)
        assert attacker.wait(timeout=30) == 0, nodes[2].log("attack")
    finally:
        stop_process(attacker)
    stats = wait_until(
        "stalled streams timed out",
        lambda: (s := gossip_stats(target))["streams"]["timed_out"] and s,
    )
    print(json.dumps(stats, indent=1))
    # Random bytes behind 0x81 claim encryption: refused as unauthenticated.
    assert stats["drops"]["malformed"] + stats["drops"]["auth"] >= 300, stats
    assert stats["drops"]["oversized"] >= 2, stats  # 65000 may not fit the bridge's buffers
    assert stats["streams"]["timed_out"] >= 1, stats
    assert stats["streams"]["busy"] >= 1, stats
    assert stats["streams"]["oversized"] >= 1, stats
    assert stats["packets"]["received"] >= 500, stats
    # Still a member in good standing, everywhere.
    wait_until("members still agree", lambda: all_see(nodes, everyone_alive(nodes)))
    assert rss_kib(target) - rss_before < 20 * 1024
