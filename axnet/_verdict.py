"""Decisions on an app's socket calls (pure): where a connect goes, what a bind means.

These functions see only values (addresses, the table, the app's identity); the
engine turns their verdicts into actions on the app's socket.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable

import attrs

from ._table import IPAddress, RealAddress, ServiceTable, VirtualAddress


@attrs.frozen(kw_only=True)
class Identity:
    """Who the app is on the network."""

    vip: IPAddress
    #: Real address of this node: where virtual listeners are bound.
    real_host: IPAddress
    #: Source ports for this app's outgoing virtual connections: the client
    #: port block its connects use now, one of *blocks*.
    block: tuple[int, int] | None
    #: Every client port block the app holds, in the order it got them (by
    #: default *block* alone): a connect finding *block* full takes a free
    #: port of another before the app asks for one more.
    blocks: tuple[tuple[int, int], ...] = attrs.field()
    #: Addresses handed out without ``--ip`` come from here; a connect into
    #: it that the table does not know is refused rather than routed.
    virtual_range: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    #: Source ports of the node's that are in no app's block: a connect with
    #: no port of a block of its own free leaves from here, seen from the
    #: node's address (None: a daemon that does not say, any port).
    spill: tuple[int, int] | None = None

    @blocks.default
    def _block_alone(self) -> tuple[tuple[int, int], ...]:
        return (self.block,) if self.block is not None else ()


@attrs.frozen
class Passthrough:
    """Not ours: perform the call unchanged (from the private copy)."""


@attrs.frozen(kw_only=True)
class Deny:
    errno: int
    reason: str


@attrs.frozen(kw_only=True)
class Redirect:
    """Connect the app's socket to *real* instead of the virtual destination."""

    real: RealAddress
    service: VirtualAddress


@attrs.frozen(kw_only=True)
class ToInert:
    """Connect the app's socket to its own inert listener, on loopback at
    *real_port*: a loopback connect to the port of a wildcard the app bound
    in the family it has no virtual address in (see `BindInert`)."""

    real_port: int


@attrs.frozen(kw_only=True)
class BindVirtual:
    """Bind to the app's virtual address: claim ``vip:port``, bind a real port."""

    port: int


@attrs.frozen(kw_only=True)
class BindInert:
    """A wildcard bind of the family the app's virtual host has no address in:
    bound as asked, where nothing reaches it."""

    port: int
    reason: str


@attrs.frozen
class BindNodePort:
    """A bind to the node's own address at any port: a port of the app's
    client blocks, where servers name a connection from it by the app's
    virtual IP, as they name its connects (a port the kernel picked could
    lie in another app's block, and be named by that app's address)."""


ConnectVerdict = Passthrough | Deny | Redirect | ToInert
BindVerdict = Passthrough | Deny | BindVirtual | BindInert | BindNodePort


def decide_connect(
    table: ServiceTable,
    me: Identity,
    ip: IPAddress,
    port: int,
    *,
    host_listens: Callable[[int], bool] = lambda port: False,
    inert: Callable[[int, int], int | None] = lambda version, port: None,
) -> ConnectVerdict:
    """Where a stream connect to ``ip:port`` goes.

    Loopback and the unspecified address (which Linux connects to this host:
    Go's ``Dial(":8080")``) reach the real host's listener on that port, as
    ever; where the host has none (*host_listens* says), the app's own
    virtual address, as a container's localhost reaches its own services:
    a health check beside a server on a wildcard.  An IPv4 address does not
    stand for an IPv6 virtual one: an IPv4 socket could not reach it.
    Where the app itself listens on a wildcard of the connect's family that
    it has no virtual address in (*inert* gives that listener's real port
    by IP version and port), the connect reaches that listener, as it would
    natively: an IPv6 app's ``127.0.0.1`` its own ``0.0.0.0`` listener.
    """
    if ip.is_loopback or ip.is_unspecified:
        real_port = inert(ip.version, port)
        own = table.resolve(me.vip, port) if ip.version >= me.vip.version else None
        if (real_port is None and own is None) or host_listens(port):
            return Passthrough()
        if real_port is not None:
            return ToInert(real_port=real_port)
        assert own is not None
        return Redirect(real=own.real, service=own.virtual)
    record = table.resolve(ip, port)
    virtual = record is not None or (
        ip == me.vip
        or table.is_virtual_ip(ip)
        or (me.virtual_range is not None and ip in me.virtual_range)
    )
    if virtual and ip.version == 4 and me.vip.version == 6:
        # The app's virtual host has one address, an IPv6 one: as on a host
        # without IPv4, IPv4 is unreachable (a server could not be told
        # who connected: an IPv4 socket cannot hold the app's address).
        return Deny(
            errno=errno.ENETUNREACH,
            reason=f"virtual {VirtualAddress(ip=ip, port=port)} is IPv4 "
            f"and this app's virtual address {me.vip} is IPv6",
        )
    if record is not None:
        return Redirect(real=record.real, service=record.virtual)
    if virtual:
        where = VirtualAddress(ip=ip, port=port)
        return Deny(errno=errno.ECONNREFUSED, reason=f"nothing serves virtual {where}")
    return Passthrough()


def decide_bind(
    table: ServiceTable,
    me: Identity,
    ip: IPAddress,
    port: int,
    *,
    ipv6_socket: bool = False,
    v6only: bool = False,
) -> BindVerdict:
    """What a stream bind to ``ip:port`` means.

    The app's own virtual address and the wildcard become a virtual binding;
    loopback and real addresses are the kernel's business; somebody else's
    virtual address cannot be bound, as on a host that does not own it.

    The node's own address is real, but its ports carry every app's
    identity: a real port serving a virtual service, and the client blocks
    by which servers name the connections of other apps, are in use; any
    port means one of the app's own blocks (`BindNodePort`).  Otherwise an
    app could take part of another's service (``SO_REUSEPORT``), or be
    seen as another app by the servers it connects to.

    The app's virtual host has exactly one address.  A wildcard bind on a
    socket that cannot carry that address family (an IPv6-only socket when the
    address is IPv4, an IPv4 socket when it is IPv6) succeeds, as the kernel's
    does on a host without an address of that family, and nothing reaches it:
    servers that listen on both families (nginx's default site: ``listen 80``
    and ``listen [::]:80``, IPv6-only) start and serve on the one they have.
    """
    if ip.is_unspecified:
        if me.vip.version == 4 and ipv6_socket and v6only:
            return BindInert(port=port, reason="IPv6-only socket, IPv4 virtual address")
        if me.vip.version == 6 and not ipv6_socket:
            return BindInert(port=port, reason="IPv4 socket, IPv6 virtual address")
        return BindVirtual(port=port)
    if ip == me.vip:
        return BindVirtual(port=port)
    if table.is_virtual_ip(ip):
        return Deny(errno=errno.EADDRNOTAVAIL, reason=f"{ip} is another app's virtual address")
    if me.virtual_range is not None and ip in me.virtual_range:
        reason = f"{ip} is in the virtual range {me.virtual_range}, and not this app's address"
        return Deny(errno=errno.EADDRNOTAVAIL, reason=reason)
    if ip == me.real_host:
        return _decide_node_port(table, me, port)
    return Passthrough()


def _decide_node_port(table: ServiceTable, me: Identity, port: int) -> BindVerdict:
    """A bind to ``port`` of the node's own address (see `decide_bind`)."""
    if port == 0:
        return BindNodePort()
    served = table.virtual_of_server(RealAddress(host=me.real_host, port=port))
    if served is not None:
        return Deny(
            errno=errno.EADDRINUSE,
            reason=f"port {port} of the node's address {me.real_host} serves virtual {served}",
        )
    owner = table.virtual_of_client(me.real_host, port)
    if owner is not None and owner != me.vip:
        return Deny(
            errno=errno.EADDRINUSE,
            reason=f"port {port} of the node's address {me.real_host} is in the client "
            f"ports of {owner}",
        )
    return Passthrough()
