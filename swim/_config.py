"""Protocol tuning, one immutable value with three presets.

`Config.lan()` is the base (memberlist DefaultLANConfig); `wan()` and
`local()` are derived from it with `attrs.evolve`, exactly as memberlist
derives DefaultWANConfig and DefaultLocalConfig. All durations are float
seconds.
"""

from __future__ import annotations

import attrs

#: Largest datagram we build, in bytes, headers and encryption included: the
#: compound packet of probes and piggybacked broadcasts stays below the
#: common 1500-byte Ethernet MTU minus IP/UDP headers (memberlist UDPBufferSize).
MAX_PACKET_BYTES = 1400

#: Largest push-pull stream payload we accept or send, in bytes (memberlist
#: maxPushStateBytes). Protects a member from a peer streaming without end.
MAX_PUSH_PULL_BYTES = 20 * 1024 * 1024

#: Largest member metadata, in bytes (memberlist MetaMaxSize).
MAX_META_BYTES = 512


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    """SWIM + Lifeguard parameters. Build with `lan()`, `wan()` or `local()`."""

    #: seconds between two probes of one member by us; scaled by the local health
    #: multiplier: effective interval = probe_interval * (awareness score + 1).
    probe_interval: float = attrs.field(default=1.0, validator=_positive)
    #: seconds to wait for a direct ack before asking `indirect_checks` members
    #: to probe for us; scaled like `probe_interval`. Should exceed the 99th
    #: percentile round trip time.
    probe_timeout: float = attrs.field(default=0.5, validator=_positive)
    #: number of members asked to probe a target indirectly (ping-req) when the
    #: direct probe times out (count, ≥ 0).
    indirect_checks: int = 3
    #: broadcast retransmit multiplier (count): every queued message is sent
    #: retransmit_mult * ceil(log10(N + 1)) times.
    retransmit_mult: int = attrs.field(default=4, validator=_at_least_one)
    #: suspicion multiplier (count): minimum suspicion timeout =
    #: suspicion_mult * max(1, log10 N) * probe_interval; Lifeguard expects
    #: k = suspicion_mult - 2 independent confirmations.
    suspicion_mult: int = attrs.field(default=4, validator=_at_least_one)
    #: maximum suspicion timeout = suspicion_max_timeout_mult * minimum timeout
    #: (count); an unconfirmed suspicion lasts this long.
    suspicion_max_timeout_mult: int = attrs.field(default=6, validator=_at_least_one)
    #: seconds between two push-pull anti-entropy exchanges with one random
    #: member; above 32 members stretched by ceil(log2 N - 5) + 1. 0 disables.
    push_pull_interval: float = 30.0
    #: seconds between two gossip rounds (broadcasts not piggybacked on probes).
    gossip_interval: float = attrs.field(default=0.2, validator=_positive)
    #: members (count) sent gossip every `gossip_interval`.
    gossip_nodes: int = 3
    #: seconds after its death during which a dead member still receives our
    #: gossip, so that it can learn it was declared dead and refute.
    gossip_to_the_dead_time: float = 30.0
    #: seconds between two push-pulls with one random dead (failed, not left)
    #: member: SWIM alone never speaks to a member it declared dead again, so
    #: without this the two sides of a healed partition stay apart (Serf's
    #: reconnect_interval).  0 disables.
    reconnect_interval: float = 30.0
    #: seconds after its death during which a failed member is still retried
    #: (Serf's reconnect_timeout, 24 h); then it is forgotten.
    reconnect_timeout: float = attrs.field(default=24 * 3600.0, validator=_positive)
    #: seconds after it left during which a left member is remembered, so that a
    #: late message about it cannot bring it back (Serf's tombstone_timeout).
    tombstone_timeout: float = attrs.field(default=24 * 3600.0, validator=_positive)
    #: seconds between two sweeps that forget failed and left members past
    #: their timeouts (Serf's reap_interval).
    reap_interval: float = attrs.field(default=15.0, validator=_positive)
    #: Lifeguard health multiplier ceiling (count): the score ranges over
    #: 0 .. awareness_max_multiplier - 1, so timeouts stretch at most *8.
    awareness_max_multiplier: int = attrs.field(default=8, validator=_at_least_one)
    #: seconds a driver should allow for one stream exchange (push-pull, TCP
    #: ping); the core never waits on it, the driver enforces it.
    tcp_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: when True no TCP fallback probe is requested after a failed UDP probe.
    disable_tcp_pings: bool = False

    @classmethod
    def lan(cls) -> Config:
        """memberlist DefaultLANConfig: 1 s probes, 200 ms gossip to 3."""
        return cls()

    @classmethod
    def wan(cls) -> Config:
        """memberlist DefaultWANConfig: slower probes, longer timeouts."""
        return attrs.evolve(
            cls.lan(),
            tcp_timeout=30.0,
            suspicion_mult=6,
            push_pull_interval=60.0,
            probe_timeout=3.0,
            probe_interval=5.0,
            gossip_nodes=4,
            gossip_interval=0.5,
            gossip_to_the_dead_time=60.0,
        )

    @classmethod
    def local(cls) -> Config:
        """memberlist DefaultLocalConfig: loopback, fast and lean."""
        return attrs.evolve(
            cls.lan(),
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
