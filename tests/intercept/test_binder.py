"""Any-port binds in the app's client blocks (real sockets, a node that counts)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

import attrs
import pytest

from axnet._node import ClaimError
from axnet._table import VirtualAddress, ip_address
from axnet._verdict import Identity
from axnet.intercept._binder import Binder
from axnet.intercept._bindings import Bindings
from axnet.intercept._tasks import Errno

LOOPBACK = ip_address("127.0.0.1")


@attrs.define
class Node:
    """Grants every claim of a block port; the pool is full; no more blocks."""

    asked_for_more: int = 0

    def claim(
        self, virtual: VirtualAddress, avoid: Sequence[int], real_port: int = 0
    ) -> tuple[int, int]:
        if real_port:
            return real_port, virtual.port
        raise ClaimError(errno.EADDRINUSE, "the pool is full")

    def listen(self, virtual: VirtualAddress) -> None:
        pass

    def release(self, virtual: VirtualAddress) -> None:
        pass

    def more_ports(self) -> tuple[int, int] | None:
        self.asked_for_more += 1
        return None

    def use_block(self, block: tuple[int, int]) -> None:
        pass


def test_a_full_block_asks_the_daemon_for_more_once_not_at_every_bind() -> None:
    # Each ask is a round trip to the daemon, with every trapped call of the
    # app waiting meanwhile: once it has none to give, it is not asked again.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        me = Identity(vip=ip_address("10.1.0.5"), real_host=LOOPBACK, block=(port, port))
        node = Node()
        binder = Binder(Bindings(release=node.release), node)
        for _ in range(3):
            with socket.socket() as sock, pytest.raises(Errno) as info:
                binder.bind_virtual(sock, 0, 1, me)
            assert info.value.errno == errno.EADDRINUSE
    assert node.asked_for_more == 1


def test_a_block_with_a_free_port_binds_it_same_real_and_virtual() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = Node()
    me = Identity(vip=ip_address("10.1.0.5"), real_host=LOOPBACK, block=(port, port))
    binder = Binder(Bindings(release=node.release), node)
    with socket.socket() as sock:
        binding = binder.bind_virtual(sock, 0, 1, me)
        assert sock.getsockname() == ("127.0.0.1", port)
    assert binding.virtual == VirtualAddress(ip=ip_address("10.1.0.5"), port=port)
    assert node.asked_for_more == 0
