"""Where an app's connections to virtual services leave from (ClientSource)."""

from __future__ import annotations

import ipaddress
import logging
import socket

import pytest

from axnet._verdict import Identity
from axnet.intercept._source import ClientSource

BLOCKS = ((40000, 40015), (40016, 40031))


def identity(block: tuple[int, int], blocks: tuple[tuple[int, int], ...]) -> Identity:
    return Identity(
        vip=ipaddress.ip_address("10.1.0.9"),
        real_host=ipaddress.ip_address("127.0.0.1"),
        block=block,
        blocks=blocks,
        spill=(59236, 60999),
    )


def test_the_spill_ports_are_warned_of_once_while_the_blocks_held_stay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A full app's connects move among the blocks it holds: before, each
    # move warned again (18 times in 4 s in a helper's run).
    source = ClientSource()
    caplog.set_level(logging.WARNING, logger="axnet.run")
    with socket.socket() as sock:
        for block in (*BLOCKS, *BLOCKS):
            source.spill_ports(sock, identity(block, BLOCKS))
        assert len(caplog.records) == 1
        # One more block, used up too: worth saying again.
        more = (*BLOCKS, (40032, 40047))
        source.spill_ports(sock, identity(more[2], more))
        assert len(caplog.records) == 2
