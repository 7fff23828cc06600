"""Several nodes of one user on one machine, each on its own loopback address.

What ``axnet demo`` runs, and what a user gets from ``--address 127.0.0.2``:
the kernel would send a connection from such a node out from 127.0.0.1 (the
loopback route's source), where the table knows another node's apps, or
none.  A server must still name each client by its own virtual IP.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator

import pytest

from axnet.testing import APPS, AxnetNode, NetnsHost, stop_process, wait_until

#: Each node's real address and its gossip port (loopback of the test host).
ADDRESSES = ("127.0.0.1", "127.0.0.2")
GOSSIP_PORT = 7946
#: Apps started one after another, each connecting at once.
FRESH_CLIENTS = 5


@contextlib.contextmanager
def _two_nodes(host: NetnsHost, engine: str, profile: str) -> Iterator[tuple[AxnetNode, AxnetNode]]:
    nodes: list[AxnetNode] = []
    try:
        for index, address in enumerate(ADDRESSES):
            args = ["--name", f"n{index + 1}", "--profile", profile]
            args += ["--address", address, "--bind", f"{address}:{GOSSIP_PORT}"]
            if index:
                args += ["--join", f"{ADDRESSES[0]}:{GOSSIP_PORT}"]
            node = AxnetNode(host, daemon_args=args)
            if engine == "python":
                node.env["AXNET_FASTPATH"] = "0"
            nodes.append(node)
            node.start()
        first, second = nodes
        wait_until("both members alive", lambda: len(second.json("members")) == 2)
        yield first, second
    finally:
        for node in nodes:
            print(node.all_logs())  # shown by pytest when the test failed
            node.close()


@pytest.fixture(params=["native", "python"])
def two_nodes(
    netns_host: NetnsHost, interception: None, request: pytest.FixtureRequest
) -> Iterator[tuple[AxnetNode, AxnetNode]]:
    with _two_nodes(netns_host, request.param, "local") as nodes:
        yield nodes


def test_clients_are_named_by_their_own_vip_from_a_second_loopback_address(
    two_nodes: tuple[AxnetNode, AxnetNode],
) -> None:
    first, second = two_nodes
    # Both nodes hand out client port blocks from the same range: a
    # connection from the second node leaving from 127.0.0.1 would take a
    # port of one of the first node's blocks, the server's own included.
    servers = [
        first.app([*APPS, "greeter", "7100"], ip="10.1.0.5", name="on-first"),
        second.app([*APPS, "greeter", "7100"], ip="10.1.0.6", name="on-second"),
    ]
    trigger = second.scratch / "go"
    # Another node's server, then its own; from an unbound socket, then
    # from one the app bound to its own address first (any port).
    targets = [
        f"{target},7100,{source}"
        for target, source in itertools.product(("10.1.0.5", "10.1.0.6"), ("", "10.1.0.9"))
    ]
    client = second.app([*APPS, "names-after", str(trigger), *targets], ip="10.1.0.9")
    try:
        both = {"10.1.0.5:7100", "10.1.0.6:7100"}
        # The client's port block reaches the first node by gossip: until it
        # has, the first node's server sees the second node's address (see
        # the README).  A client that has run for a moment is named.
        wait_until(
            "services and the client's record known on both nodes",
            lambda: all(
                both <= node.services().keys()
                and any(a["vip"] == "10.1.0.9" for a in node.json("apps"))
                for node in (first, second)
            ),
        )
        trigger.touch()
        assert client.wait(timeout=30) == 0
        lines = (second.logs / "app2.out").read_text().splitlines()  # its second app
        assert len(lines) == len(targets), second.log("app2")
        for target, line in zip(targets, lines, strict=True):
            seen = json.loads(line)
            assert seen["sockname"][0] == "10.1.0.9", seen
            assert seen["peername"] == [target.split(",")[0], 7100], seen
            assert seen["server"]["accepted_from"] == seen["sockname"], seen
            assert seen["server"]["peername"] == seen["sockname"], seen
    finally:
        for proc in [client, *servers]:
            stop_process(proc)


def test_a_new_app_is_named_by_its_vip_from_its_first_connection_to_another_node(
    netns_host: NetnsHost, interception: None
) -> None:
    # The WAN profile gossips every 0.5 s: an app's first connection is
    # made long before gossip would bring its port block to the server's
    # node.  Its daemon sends the block there itself before the app starts.
    with _two_nodes(netns_host, "native", "wan") as (first, second):
        server = first.app([*APPS, "greeter", "7100"], ip="10.1.0.5", name="on-first")
        try:
            wait_until("the service known on the second node", lambda: bool(second.services()))
            for index in range(1, FRESH_CLIENTS + 1):
                vip = f"10.1.0.{10 + index}"
                client = second.app([*APPS, "names", "10.1.0.5", "7100"], ip=vip)
                assert client.wait(timeout=30) == 0, second.log(f"app{index}")
                seen = json.loads((second.logs / f"app{index}.out").read_text())
                assert seen["sockname"][0] == vip, seen
                assert seen["server"]["accepted_from"] == seen["sockname"], seen
        finally:
            stop_process(server)


def test_a_second_daemon_on_a_taken_gossip_address_says_how_to_fix_it(
    netns_host: NetnsHost,
) -> None:
    first = AxnetNode(netns_host, daemon_args=["--advertise", "127.0.0.1"]).start()
    second = AxnetNode(netns_host, daemon_args=["--advertise", "127.0.0.2"])
    try:
        second.launch()
        assert second.daemon is not None
        assert second.daemon.wait(timeout=30) == 1
        last = second.log("daemon").splitlines()[-1]
        assert "cannot listen for gossip on 0.0.0.0:7946: Address already in use" in last
        assert "give each its own --bind HOST:PORT" in last
    finally:
        second.close()
        first.close()


def test_an_app_whose_labels_cannot_be_gossiped_is_refused_with_why(
    netns_host: NetnsHost, interception: None
) -> None:
    # Within the wire's limits (32 labels of 255 bytes), but larger than a
    # gossip packet: before, the app ran and its records spread only by
    # push-pull, seconds to half a minute late, the daemon logging a warning
    # at every write.  A node that does not gossip takes it; an app already
    # running when its daemon comes back clustering is taken too.
    labels = [f"k{i}={'v' * 120}" for i in range(12)]
    node = AxnetNode(netns_host).start()
    try:
        running = node.app([*APPS, "greeter", "7101"], ip="10.1.0.6", labels=labels)
        node.wait_service("10.1.0.6:7101")
        node.stop()
        node.daemon_args = ["--advertise", "127.0.0.1"]
        node.start()
        node.wait_service("10.1.0.6:7101")  # re-attached
        assert "with records too large to gossip" in node.log("daemon")
        refused = node.run(["/bin/true"], ip="10.1.0.5", labels=labels)
        assert refused.returncode == 1
        assert "the app's name and labels are too long to gossip" in refused.stderr
        assert "give it fewer or shorter labels" in refused.stderr
        assert node.run(["/bin/true"], ip="10.1.0.5", labels=labels[:2]).returncode == 0
        assert running.poll() is None
    finally:
        node.close()
