"""Clusters of axnet daemons on namespace hosts, one daemon per host, all as ``nobody``."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from axnet.intercept._probe import probe_user_notification
from axnet.testing import AxnetNode, Cluster, gossip_daemon_args, shared_tmp

#: Gossip timings of the test daemons: memberlist's LAN defaults.  (The `local`
#: preset detects failures faster, but retransmits each broadcast only
#: 2 × ceil(log10(N + 1)) times, which at 5 members leaves a change to the
#: next push-pull too often for a test's patience.)
PROFILE = "lan"


class Nodes(list[AxnetNode]):
    """The nodes of one cluster, in host order, and the hosts' network (faults)."""

    def __init__(self, net: Cluster) -> None:
        super().__init__()
        self.net = net


StartNodes = Callable[..., Nodes]


@pytest.fixture
def interception() -> None:
    """Skip, with the probe's reason, when apps cannot run under ``axnet run`` here."""
    reason = probe_user_notification()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def key_file() -> Iterator[Callable[[], Path]]:
    """``key_file()``: a new gossip key file that ``nobody`` can read."""
    made: list[Path] = []

    def make() -> Path:
        directory = shared_tmp()
        path = directory / "gossip.key"
        path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        path.chmod(0o644)
        made.append(directory)
        return path

    yield make
    for directory in made:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


@pytest.fixture
def start_nodes(cluster: Callable[[int], Cluster]) -> Iterator[StartNodes]:
    """``start_nodes(n)``: n hosts, a daemon on each, all joined through host 1."""
    started: list[AxnetNode] = []

    def start(
        n: int,
        *,
        key_files: Sequence[Path | None] | None = None,
        join: bool = True,
        profile: str = PROFILE,
    ) -> Nodes:
        hosts = cluster(n)
        nodes = Nodes(hosts)
        for index, host in enumerate(hosts):
            key = key_files[index] if key_files is not None else None
            seed = hosts[0] if join and index else None
            args = gossip_daemon_args(
                host, f"h{index + 1}", seed=seed, key_file=key, profile=profile
            )
            node = AxnetNode(host, daemon_args=args)
            started.append(node)
            nodes.append(node.launch())
        for node in nodes:
            node.wait_ready()
        return nodes

    yield start
    for node in started:
        print(f"===== {node.host.name}\n{node.all_logs()}")  # shown when a test failed
        node.close()
