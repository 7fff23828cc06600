"""Decisions on connect and bind: values in, verdicts out."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from axnet._table import (
    AppRecord,
    IPAddress,
    RealAddress,
    ServiceRecord,
    ServiceTable,
    VirtualAddress,
    ip_address,
)
from axnet._verdict import (
    BindInert,
    BindNodePort,
    BindVirtual,
    Deny,
    Identity,
    Passthrough,
    Redirect,
    ToInert,
    decide_bind,
    decide_connect,
)

HOST = ip_address("192.0.2.1")
MY_VIP = ip_address("10.77.0.2")
WEB_VIP = ip_address("10.77.0.5")  # another app, known to the table
MY_VIP6 = ip_address("fd00::2")
RANGE = ipaddress.ip_network("10.77.0.0/16")


def table() -> ServiceTable:
    t = ServiceTable()
    t.merge(
        AppRecord(
            app_id="web",
            node="n2",
            vip=WEB_VIP,
            real_host=ip_address("192.0.2.2"),
            port_lo=40000,
            port_hi=40099,
        )
    )
    t.merge(
        ServiceRecord(
            virtual=VirtualAddress(ip=WEB_VIP, port=80),
            real=RealAddress(host=ip_address("192.0.2.2"), port=20000),
            node="n2",
            app_id="web",
        )
    )
    return t


def me(vip: IPAddress = MY_VIP, *, virtual_range: bool = True) -> Identity:
    return Identity(
        vip=vip,
        real_host=HOST,
        block=(40000, 40099),
        virtual_range=RANGE if virtual_range else None,
    )


# -- connect ---------------------------------------------------------------


def test_connect_to_a_served_virtual_address_is_redirected() -> None:
    verdict = decide_connect(table(), me(), WEB_VIP, 80)
    assert verdict == Redirect(
        real=RealAddress(host=ip_address("192.0.2.2"), port=20000),
        service=VirtualAddress(ip=ip_address("10.77.0.5"), port=80),
    )


def test_an_app_with_an_ipv6_address_cannot_reach_virtual_ipv4() -> None:
    # Its virtual host has no IPv4 address: as natively on such a host, an
    # IPv4 destination is unreachable, served or not.  (Let through, the
    # server's accept could not hold the client's address.)  Real IPv4
    # addresses are the kernel's business, as ever.
    for port in (80, 81):
        verdict = decide_connect(table(), me(MY_VIP6), WEB_VIP, port)
        assert isinstance(verdict, Deny) and verdict.errno == errno.ENETUNREACH, verdict
        assert "fd00::2 is IPv6" in verdict.reason
    assert decide_connect(table(), me(MY_VIP6), ip_address("192.0.2.9"), 80) == Passthrough()
    assert isinstance(decide_connect(table(), me(), WEB_VIP, 80), Redirect)
    # IPv6 addresses are bracketed in what is logged.
    own = decide_connect(table(), me(MY_VIP6), MY_VIP6, 81)
    assert isinstance(own, Deny) and own.reason == "nothing serves virtual [fd00::2]:81"


def test_connect_to_own_service_is_redirected() -> None:
    t = table()
    t.merge(
        ServiceRecord(
            virtual=VirtualAddress(ip=MY_VIP, port=8080),
            real=RealAddress(host=HOST, port=20001),
            node="n1",
            app_id="me",
        )
    )
    assert decide_connect(t, me(), MY_VIP, 8080) == Redirect(
        real=RealAddress(host=HOST, port=20001),
        service=VirtualAddress(ip=ip_address("10.77.0.2"), port=8080),
    )


@pytest.mark.parametrize("to", ["127.0.0.1", "127.0.0.2", "0.0.0.0", "::1", "::"])
def test_loopback_and_the_unspecified_address_reach_the_apps_own_services(to: str) -> None:
    t = table()
    own = ServiceRecord(
        virtual=VirtualAddress(ip=MY_VIP, port=8080),
        real=RealAddress(host=HOST, port=20001),
        node="n1",
        app_id="me",
    )
    t.merge(own)
    ip = ip_address(to)
    assert decide_connect(t, me(), ip, 8080) == Redirect(real=own.real, service=own.virtual)
    # Nothing of its own there: the real host's, as natively.
    assert decide_connect(t, me(), ip, 8081) == Passthrough()
    # Another app's service is no loopback service of this one.
    assert decide_connect(t, me(), ip, 80) == Passthrough()
    # A real listener of the host on the port comes first.
    assert decide_connect(t, me(), ip, 8080, host_listens={8080}.__contains__) == Passthrough()


def test_ipv4_loopback_does_not_stand_for_an_ipv6_virtual_address() -> None:
    t = table()
    own = ServiceRecord(
        virtual=VirtualAddress(ip=MY_VIP6, port=8080),
        real=RealAddress(host=ip_address("::1"), port=20001),
        node="n1",
        app_id="me",
    )
    t.merge(own)
    assert decide_connect(t, me(MY_VIP6), ip_address("127.0.0.1"), 8080) == Passthrough()
    assert decide_connect(t, me(MY_VIP6), ip_address("::1"), 8080) == Redirect(
        real=own.real, service=own.virtual
    )


@pytest.mark.parametrize(
    ("vip", "to"), [(MY_VIP6, "127.0.0.1"), (MY_VIP6, "0.0.0.0"), (MY_VIP, "::1")]
)
def test_loopback_reaches_the_apps_own_wildcard_of_the_family_it_lacks(
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address, to: str
) -> None:
    # 0.0.0.0:8080 beside an IPv6 virtual address (or [::]:8080 IPv6-only
    # beside an IPv4 one) is bound on loopback at a port of the kernel's: a
    # loopback connect of that family reaches it, as natively, before the
    # app's own service of the other family.
    t = table()
    t.merge(
        ServiceRecord(
            virtual=VirtualAddress(ip=vip, port=8080),
            real=RealAddress(host=HOST, port=20001),
            node="n1",
            app_id="me",
        )
    )
    ip = ip_address(to)

    def inert(version: int, port: int) -> int | None:
        return 40001 if (version, port) == (ip.version, 8080) else None

    assert decide_connect(t, me(vip), ip, 8080, inert=inert) == ToInert(real_port=40001)
    # A real listener of the host on the port comes first, as for services.
    assert decide_connect(t, me(vip), ip, 8080, inert=inert, host_listens={8080}.__contains__) == (
        Passthrough()
    )
    assert decide_connect(t, me(vip), ip, 8081, inert=inert) == Passthrough()


def test_connect_to_a_withdrawn_service_is_refused() -> None:
    t = table()
    t.merge(
        ServiceRecord(
            virtual=VirtualAddress(ip=WEB_VIP, port=80),
            real=RealAddress(host=ip_address("192.0.2.2"), port=20000),
            node="n2",
            app_id="web",
            version=1,
            deleted=True,
        )
    )
    verdict = decide_connect(t, me(), WEB_VIP, 80)
    assert verdict == Deny(errno=errno.ECONNREFUSED, reason="nothing serves virtual 10.77.0.5:80")


@pytest.mark.parametrize(
    ("ip", "virtual_range"),
    [
        (WEB_VIP, False),  # a known virtual IP, nothing on that port
        (MY_VIP, False),  # our own virtual IP, nothing listening
        (ip_address("10.77.9.9"), True),  # in the virtual range, unknown
    ],
)
def test_connect_to_a_virtual_ip_with_nothing_on_the_port_is_refused(
    ip: IPAddress, virtual_range: bool
) -> None:
    verdict = decide_connect(table(), me(virtual_range=virtual_range), ip, 81)
    assert isinstance(verdict, Deny)
    assert verdict.errno == errno.ECONNREFUSED
    assert verdict.reason == f"nothing serves virtual {ip}:81"


@pytest.mark.parametrize("ip", ["192.0.2.2", "127.0.0.1", "10.78.0.1", "::1", "2001:db8::1"])
def test_connect_to_a_real_address_passes_through(ip: str) -> None:
    assert decide_connect(table(), me(), ip_address(ip), 80) == Passthrough()


def test_connect_outside_a_missing_virtual_range_passes_through() -> None:
    assert decide_connect(table(), me(virtual_range=False), ip_address("10.77.9.9"), 80) == (
        Passthrough()
    )


# -- bind -------------------------------------------------------------------


@pytest.mark.parametrize("ip", ["0.0.0.0", str(MY_VIP)])
def test_bind_own_vip_or_wildcard_is_virtual(ip: str) -> None:
    assert decide_bind(table(), me(), ip_address(ip), 80) == BindVirtual(port=80)


def test_bind_port_zero_is_kept_for_the_node_to_choose() -> None:
    assert decide_bind(table(), me(), ip_address("0.0.0.0"), 0) == BindVirtual(port=0)


def test_bind_ipv6_wildcard_on_dual_stack_socket_with_ipv4_vip_is_virtual() -> None:
    verdict = decide_bind(table(), me(), ip_address("::"), 80, ipv6_socket=True, v6only=False)
    assert verdict == BindVirtual(port=80)


def test_bind_ipv6_only_socket_with_ipv4_vip_is_inert() -> None:
    verdict = decide_bind(table(), me(), ip_address("::"), 80, ipv6_socket=True, v6only=True)
    assert verdict == BindInert(port=80, reason="IPv6-only socket, IPv4 virtual address")


def test_bind_ipv4_socket_with_ipv6_vip_is_inert() -> None:
    verdict = decide_bind(table(), me(MY_VIP6), ip_address("0.0.0.0"), 80)
    assert verdict == BindInert(port=80, reason="IPv4 socket, IPv6 virtual address")


def test_bind_ipv6_wildcard_with_ipv6_vip_is_virtual() -> None:
    verdict = decide_bind(table(), me(MY_VIP6), ip_address("::"), 80, ipv6_socket=True)
    assert verdict == BindVirtual(port=80)


def test_bind_another_apps_vip_is_eaddrnotavail() -> None:
    verdict = decide_bind(table(), me(), WEB_VIP, 80)
    assert verdict == Deny(
        errno=errno.EADDRNOTAVAIL, reason=f"{WEB_VIP} is another app's virtual address"
    )


def test_bind_an_unheld_address_of_the_virtual_range_is_eaddrnotavail() -> None:
    # Nobody holds it: the reason says what it is, not whose.
    verdict = decide_bind(table(), me(virtual_range=True), ip_address("10.77.9.9"), 80)
    assert verdict == Deny(
        errno=errno.EADDRNOTAVAIL,
        reason="10.77.9.9 is in the virtual range 10.77.0.0/16, and not this app's address",
    )


@pytest.mark.parametrize("ip", ["127.0.0.1", "192.0.2.1", "::1", "10.78.0.1"])
def test_bind_real_address_passes_through(ip: str) -> None:
    assert decide_bind(table(), me(), ip_address(ip), 80) == Passthrough()


def _with_neighbour() -> ServiceTable:
    """The table, with this app and another of this node (HOST), serving
    10.77.0.7:443."""
    t = table()
    for app_id, vip, port_lo in (("me", MY_VIP, 40000), ("db", ip_address("10.77.0.7"), 41000)):
        t.merge(
            AppRecord(
                app_id=app_id,
                node="n1",
                vip=vip,
                real_host=HOST,
                port_lo=port_lo,
                port_hi=port_lo + 99,
            )
        )
    t.merge(
        ServiceRecord(
            virtual=VirtualAddress(ip=ip_address("10.77.0.7"), port=443),
            real=RealAddress(host=HOST, port=20007),
            node="n1",
            app_id="db",
        )
    )
    return t


def test_bind_the_nodes_port_of_another_apps_service_is_in_use() -> None:
    # With SO_REUSEPORT on both sockets it would take part of that service.
    verdict = decide_bind(_with_neighbour(), me(), HOST, 20007)
    assert verdict == Deny(
        errno=errno.EADDRINUSE,
        reason="port 20007 of the node's address 192.0.2.1 serves virtual 10.77.0.7:443",
    )


def test_bind_the_nodes_port_of_another_apps_client_block_is_in_use() -> None:
    # Servers would name the app's connections from it by the other app.
    verdict = decide_bind(_with_neighbour(), me(), HOST, 41005)
    assert verdict == Deny(
        errno=errno.EADDRINUSE,
        reason="port 41005 of the node's address 192.0.2.1 is in the client ports of 10.77.0.7",
    )


def test_bind_the_nodes_other_ports_passes_through() -> None:
    # Its own block, and a port in nobody's.
    for port in (40005, 9100):
        assert decide_bind(_with_neighbour(), me(), HOST, port) == Passthrough(), port


def test_bind_any_port_of_the_nodes_address_takes_one_of_the_apps_own() -> None:
    assert decide_bind(_with_neighbour(), me(), HOST, 0) == BindNodePort()
