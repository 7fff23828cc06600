"""Which bound sockets the app has closed: what a sweep of the engine decides."""

from __future__ import annotations

import collections
import os
import socket

import pytest

from axnet._table import MAX_RETIRED, VirtualAddress, ip_address
from axnet.intercept import _bindings, _sockdiag
from axnet.intercept._bindings import LOOPBACK4, BoundSocket


@pytest.fixture
def fd_tables(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[dict[int, set[int]], collections.Counter[int]]:
    """Fake fd tables by pid, and how often each was read."""
    tables: dict[int, set[int]] = {}
    reads: collections.Counter[int] = collections.Counter()

    def socket_inodes(pid: int) -> set[int]:
        reads[pid] += 1
        return tables.get(pid, set())

    monkeypatch.setattr(_sockdiag, "socket_inodes", socket_inodes)
    monkeypatch.setattr(_sockdiag, "descendants", lambda pid: [100, 200])
    return tables, reads


def test_listening_sockets_are_told_by_the_kernels_list(
    fd_tables: tuple[dict[int, set[int]], collections.Counter[int]],
) -> None:
    _, reads = fd_tables
    open_ = BoundSocket(1, pid=100, listening=True)
    assert _bindings.closed([open_], listening={1}) == []
    assert not reads  # no fd table read for listeners in the kernel's list


def test_a_listener_shut_down_but_open_is_not_closed(
    fd_tables: tuple[dict[int, set[int]], collections.Counter[int]],
) -> None:
    # shutdown(SHUT_RD) takes a listener off the kernel's list; the app
    # still holds it (and may listen on it again).
    tables, _ = fd_tables
    tables[100] = {1}
    shut, gone = BoundSocket(1, pid=100, listening=True), BoundSocket(2, pid=100, listening=True)
    assert _bindings.closed([shut, gone], listening=set()) == [gone]


def test_a_bound_socket_is_open_while_any_process_of_the_app_holds_it(
    fd_tables: tuple[dict[int, set[int]], collections.Counter[int]],
) -> None:
    tables, _ = fd_tables
    tables[100] = {1}
    tables[200] = {2}  # a child holds what a thread of 100 bound, then closed
    held_here, held_by_child, gone = (BoundSocket(i, pid=100) for i in (1, 2, 3))
    assert _bindings.closed([held_here, held_by_child, gone], listening=set()) == [gone]


def test_each_fd_table_is_read_once_however_many_sockets(
    fd_tables: tuple[dict[int, set[int]], collections.Counter[int]],
) -> None:
    tables, reads = fd_tables
    tables[100] = set(range(1000))
    sockets = [BoundSocket(i, pid=100) for i in range(2000)]  # half of them closed
    closed = _bindings.closed(sockets, listening=set())
    assert [s.inode for s in closed] == list(range(1000, 2000))
    assert reads == {100: 1, 200: 1}


def test_the_kernels_list_of_listeners_is_filtered_by_port_in_the_kernel() -> None:
    # A neighbour's thousands of listeners must not cost a sweep: only those
    # within the ports the app bound come back.
    listeners = [socket.socket(family) for family in (socket.AF_INET, socket.AF_INET6) * 3]
    try:
        for sock in listeners:
            sock.bind(("::1" if sock.family == socket.AF_INET6 else "127.0.0.1", 0))
            sock.listen()
        by_port = sorted(
            (sock.getsockname()[1], os.fstat(sock.fileno()).st_ino) for sock in listeners
        )
        (lo, _), *middle, (hi, _) = by_port
        inside = {inode for port, inode in middle if lo < port < hi}
        got = _sockdiag.listening_inodes((lo + 1, hi - 1))
        assert inside <= got
        assert by_port[0][1] not in got and by_port[-1][1] not in got
        assert {inode for _, inode in by_port} <= _sockdiag.listening_inodes()
    finally:
        for sock in listeners:
            sock.close()


@pytest.mark.parametrize(("lo", "hi"), [(-1, 5), (5, 4), (0, 65536)])
def test_a_port_filter_takes_only_ports(lo: int, hi: int) -> None:
    with pytest.raises(ValueError, match="bad port range"):
        _sockdiag.port_filter(lo, hi)


def test_a_kernel_that_refuses_the_filter_gets_the_whole_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Unseen, but then a listener the app closed would never be withdrawn.
    monkeypatch.setattr(_sockdiag, "port_filter", lambda lo, hi: b"\x04\x00\x01\x00")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        inode = os.fstat(sock.fileno()).st_ino
        assert inode in _sockdiag.listening_inodes((port + 1, port + 1))


def test_a_released_listener_leaves_its_name_to_the_connections_it_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each keeps the name (Bindings.retired, by socket inode), as the
    # kernel's keep theirs; a connection from another socket, one that
    # happens to get the same port later included, does not.
    bindings = _bindings.Bindings(release=lambda virtual: None)
    vip = ip_address("10.1.0.5")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
    with client, accepted:
        web = _bindings.Binding(
            virtual=VirtualAddress(ip=vip, port=80),
            real_port=port,
            sockets=[],
            host=LOOPBACK4,
            listening=True,
        )
        bindings.add(web)
        bindings.release([web])
        assert bindings.at(port) is None
        assert bindings.retired_name(os.fstat(accepted.fileno()).st_ino) == VirtualAddress(
            ip=vip, port=80
        )
        assert bindings.retired_name(os.fstat(client.fileno()).st_ino) is None
    # Only the newest MAX_RETIRED.
    monkeypatch.setattr(
        _sockdiag, "connection_inodes", lambda port: set(range(port, port + MAX_RETIRED))
    )
    for base in (1, 1 + MAX_RETIRED):
        binding = _bindings.Binding(
            virtual=VirtualAddress(ip=vip, port=81),
            real_port=base,
            sockets=[],
            host=LOOPBACK4,
            listening=True,
        )
        bindings.add(binding)
        bindings.release([binding])
    assert len(bindings.retired) == MAX_RETIRED
    assert bindings.retired_name(1) is None
    assert bindings.retired_name(1 + MAX_RETIRED) == VirtualAddress(ip=vip, port=81)
