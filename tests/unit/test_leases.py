"""The lease file: what apps hold, read by the next daemon (see axnet._leases)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from axnet._leasefile import load, process_started, save
from axnet._leases import Binding, Lease, decode, encode
from axnet._table import VirtualAddress, ip_address
from axnet._wire import WireError, pack

LEASE = Lease(
    app_id="n1/1234/1",
    pid=1234,
    started=99,
    vip=ip_address("10.1.0.5"),
    blocks=((32768, 33023), (33024, 33279)),
    bindings=(
        Binding(virtual=VirtualAddress(ip=ip_address("10.1.0.5"), port=80), real_port=20000),
        Binding(virtual=VirtualAddress(ip=ip_address("fd00::5"), port=443), real_port=20001),
    ),
)


def test_leases_round_trip() -> None:
    assert decode(encode([LEASE, Lease(app_id="b", pid=1, started=2, vip=LEASE.vip)])) == [
        LEASE,
        Lease(app_id="b", pid=1, started=2, vip=LEASE.vip),
    ]
    assert decode(encode([])) == []
    # A server with thousands of listeners (seen: 2000) keeps its lease.
    many = tuple(
        Binding(virtual=VirtualAddress(ip=LEASE.vip, port=p), real_port=p) for p in range(1, 5001)
    )
    big = Lease(app_id="big", pid=1, started=2, vip=LEASE.vip, bindings=many)
    assert decode(encode([big])) == [big]


@pytest.mark.parametrize(
    "content",
    [
        [],
        {"format": 2, "leases": []},
        {"format": 1},
        {"format": 1, "leases": {}},
        {"format": 1, "leases": [["a", 1, 2, "10.1.0.5", []]]},
        {"format": 1, "leases": [["a", 1, 2, "not an ip", [], []]]},
        {"format": 1, "leases": [["a", True, 2, "10.1.0.5", [], []]]},
        {"format": 1, "leases": [["a", 1, 2, "10.1.0.5", [[9, 8]], []]]},
        {"format": 1, "leases": [["a", 1, 2, "10.1.0.5", [], [["10.1.0.5", 70000, 1]]]]},
        {"format": 1, "leases": [["a", 1, 2, "10.1.0.5", [[1, 2]] * 65537, []]]},
    ],
)
def test_a_lease_file_that_is_not_ours_is_refused(content: object) -> None:
    with pytest.raises(WireError):
        decode(pack(content))


@given(st.binary(max_size=200))
def test_garbage_is_refused_cleanly(data: bytes) -> None:
    try:
        decode(data)
    except WireError:
        pass


def test_process_started_names_one_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = process_started(child.pid)
        assert started is not None and started > 0
    finally:
        child.kill()
        child.wait()
    assert process_started(child.pid) is None
    assert process_started(0) is None
    assert process_started(-1) is None


def test_only_leases_of_apps_still_running_are_loaded(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = process_started(child.pid)
        assert started is not None
        running = Lease(app_id="running", pid=child.pid, started=started, vip=LEASE.vip)
        # The same pid with another start time is another process (a reused
        # pid); a start time of 0 was never known.
        reused = Lease(app_id="reused", pid=child.pid, started=started + 1, vip=LEASE.vip)
        unknown = Lease(app_id="unknown", pid=child.pid, started=0, vip=LEASE.vip)
        path = tmp_path / "leases"
        save(path, [running, reused, unknown, LEASE])
        assert path.stat().st_mode & 0o777 == 0o600
        assert load(path) == [running]
    finally:
        child.kill()
        child.wait()
    assert load(path) == []
    assert load(tmp_path / "none") == []
    assert [p.name for p in tmp_path.iterdir()] == ["leases"]  # no temporary left


def test_a_broken_lease_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "leases"
    path.write_bytes(b"\x93garbage")
    with caplog.at_level(logging.WARNING, logger="axnet.daemon"):
        assert load(path) == []
    assert "leases ignored" in caplog.text
    save(path, [LEASE])  # and the next write replaces it
    assert decode(path.read_bytes()) == [LEASE]


def test_a_lease_file_that_cannot_be_written_says_why(tmp_path: Path) -> None:
    error = save(tmp_path / "missing" / "leases", [LEASE])
    assert isinstance(error, FileNotFoundError)
    (tmp_path / "leases").mkdir()
    assert isinstance(save(tmp_path / "leases", [LEASE]), IsADirectoryError)
    assert [p.name for p in tmp_path.iterdir()] == ["leases"]  # no temporary left


def test_a_lease_file_that_is_not_a_regular_file_is_ignored_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A FIFO there once held the daemon's start forever, before its socket.
    fifo = tmp_path / "leases"
    os.mkfifo(fifo)
    with caplog.at_level(logging.WARNING, logger="axnet.daemon"):
        assert load(fifo) == []
        (tmp_path / "device").symlink_to("/dev/zero")
        assert load(tmp_path / "device") == []  # no link is followed
    assert caplog.text.count("not a regular file") == 1
    assert caplog.text.count("leases not read") == 1


def test_nothing_planted_at_the_temporary_name_is_written_through(tmp_path: Path) -> None:
    # Planted by another user while the directory was open to them (the
    # daemon makes it 0700 at start): a link to a file of ours, and a FIFO,
    # which once held every write (and the daemon's stop) forever.
    precious = tmp_path / "precious"
    precious.write_bytes(b"mine")
    path = tmp_path / "leases"
    path.with_name(".leases.new").symlink_to(precious)
    assert save(path, [LEASE]) is None
    assert precious.read_bytes() == b"mine"
    assert decode(path.read_bytes()) == [LEASE]
    os.mkfifo(path.with_name(".leases.new"))
    assert save(path, []) is None
    assert decode(path.read_bytes()) == []
