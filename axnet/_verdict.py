"""Decisions on an app's socket calls (pure): where a connect goes, what a bind means.

These functions see only values (addresses, the table, the app's identity); the
engine turns their verdicts into actions on the app's socket.
"""

from __future__ import annotations

import errno
import ipaddress

import attrs

from ._table import IPAddress, RealAddress, ServiceTable


@attrs.frozen(kw_only=True)
class Identity:
    """Who the app is on the network."""

    vip: IPAddress
    #: Real address of this node: where virtual listeners are bound.
    real_host: IPAddress
    #: Source ports for this app's outgoing virtual connections.
    block: tuple[int, int] | None
    #: Addresses handed out without ``--ip`` come from here; a connect into
    #: it that the table does not know is refused rather than routed.
    virtual_range: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


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
    service: str


@attrs.frozen(kw_only=True)
class BindVirtual:
    """Bind to the app's virtual address: claim ``vip:port``, bind a real port."""

    port: int


ConnectVerdict = Passthrough | Deny | Redirect
BindVerdict = Passthrough | Deny | BindVirtual


def decide_connect(table: ServiceTable, me: Identity, ip: IPAddress, port: int) -> ConnectVerdict:
    """Where a stream connect to ``ip:port`` goes."""
    record = table.resolve(ip, port)
    if record is not None:
        return Redirect(real=record.real, service=str(record.virtual))
    if (
        ip == me.vip
        or table.is_virtual_ip(ip)
        or (me.virtual_range is not None and ip in me.virtual_range)
    ):
        return Deny(errno=errno.ECONNREFUSED, reason=f"nothing serves virtual {ip}:{port}")
    return Passthrough()


def decide_bind(table: ServiceTable, me: Identity, ip: IPAddress, port: int) -> BindVerdict:
    """What a stream bind to ``ip:port`` means.

    The app's own virtual address and the wildcard become a virtual binding;
    loopback and real addresses are the kernel's business; somebody else's
    virtual address cannot be bound, as on a host that does not own it.
    """
    if ip == me.vip or ip.is_unspecified:
        return BindVirtual(port=port)
    if table.is_virtual_ip(ip) or (me.virtual_range is not None and ip in me.virtual_range):
        return Deny(errno=errno.EADDRNOTAVAIL, reason=f"{ip} is another app's virtual address")
    return Passthrough()
