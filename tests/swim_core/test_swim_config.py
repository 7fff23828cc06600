"""Config presets match memberlist DefaultLANConfig / WAN / Local."""

from __future__ import annotations

import attrs
import pytest

from swim import MAX_PACKET_BYTES, MAX_PUSH_PULL_BYTES, Config


def test_lan_defaults() -> None:
    c = Config.lan()
    assert c.probe_interval == 1.0
    assert c.probe_timeout == 0.5
    assert c.gossip_interval == 0.2
    assert c.gossip_nodes == 3
    assert c.suspicion_mult == 4
    assert c.suspicion_max_timeout_mult == 6
    assert c.push_pull_interval == 30.0
    assert c.retransmit_mult == 4
    assert c.indirect_checks == 3
    assert c.awareness_max_multiplier == 8
    assert c.gossip_to_the_dead_time == 30.0
    assert c.tcp_timeout == 10.0
    assert c.disable_tcp_pings is False


def test_wan_derives_from_lan() -> None:
    expected = attrs.evolve(
        Config.lan(),
        tcp_timeout=30.0,
        suspicion_mult=6,
        push_pull_interval=60.0,
        probe_timeout=3.0,
        probe_interval=5.0,
        gossip_nodes=4,
        gossip_interval=0.5,
        gossip_to_the_dead_time=60.0,
    )
    assert Config.wan() == expected


def test_local_derives_from_lan() -> None:
    expected = attrs.evolve(
        Config.lan(),
        tcp_timeout=1.0,
        indirect_checks=1,
        retransmit_mult=2,
        suspicion_mult=3,
        push_pull_interval=15.0,
        probe_timeout=0.2,
        probe_interval=1.0,
        gossip_interval=0.1,
        gossip_to_the_dead_time=15.0,
        reconnect_interval=10.0,
    )
    assert Config.local() == expected


def test_limits_are_named() -> None:
    assert MAX_PACKET_BYTES == 1400
    assert MAX_PUSH_PULL_BYTES == 20 * 1024 * 1024


def test_validation_message() -> None:
    with pytest.raises(ValueError, match=r"^probe_interval must be > 0, got 0$"):
        Config(probe_interval=0)
