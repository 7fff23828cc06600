"""Counters a Swim core keeps about its own traffic.

Drops caused by peers (bad authentication, malformed bytes) are counted here
instead of raised: a hostile or misconfigured peer must not be able to stop
a member, but an operator must be able to see it.
"""

from __future__ import annotations

import attrs


@attrs.define(kw_only=True)
class Stats:
    """Monotonic counters; read them, never reset them from outside."""

    packets_received: int = 0
    packets_sent: int = 0
    packets_dropped_auth: int = 0
    packets_dropped_malformed: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    #: received messages ignored: pings beyond the one a datagram may carry
    messages_dropped: int = 0
    #: peers' messages too big ever to ride on a packet, not disseminated
    broadcasts_dropped_oversized: int = 0
    #: messages dropped from a full broadcast queue (the widest spread first)
    broadcasts_dropped_full: int = 0
    #: application broadcasts from no member we know
    broadcasts_dropped_unknown: int = 0
    #: broadcast keys forgotten to keep MAX_USER_KEYS (oldest first)
    broadcast_keys_forgotten: int = 0
    streams_sent: int = 0
    streams_received: int = 0
    streams_failed: int = 0
    streams_dropped_auth: int = 0
    streams_dropped_malformed: int = 0
    #: stream replies that named no member but us: the peer was this node
    #: (a seed that reaches it by another address, such as 127.0.0.1)
    streams_from_self: int = 0
    probes_sent: int = 0
    probes_failed: int = 0
    refutations: int = 0
    #: messages about our own name from another address (a duplicate name)
    name_conflicts: int = 0
    #: leaves not taken for the member's: from another address (a push-pull
    #: entry), or at another incarnation than its own (gossip)
    leaves_ignored: int = 0
    #: push-pulls started with a failed member (reconnect)
    reconnects: int = 0
    #: failed and left members forgotten after their timeouts
    members_reaped: int = 0
    #: datagrams `deliver` sent straight to members, and those never acked
    deliveries_sent: int = 0
    deliveries_unacked: int = 0
