"""The supervisor's own failure handling, without a daemon."""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from axnet import _cli
from axnet._supervisor import EngineFailed, RunOptions, Session, Supervisor, _spill
from axnet._table import TOMBSTONE_SWEEP_S, TOMBSTONE_TTL, RealAddress, VirtualAddress
from axnet._wire import FrameDecoder, frame


class _BrokenEngine:
    def serve(self) -> None:
        raise RuntimeError("a bug in the engine")


def test_an_engine_that_dies_stops_the_app_instead_of_leaving_it_hanging() -> None:
    # Nobody would answer the app's trapped calls any more: each would hang.
    app = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pidfd = os.pidfd_open(app.pid)
    try:
        supervisor = Supervisor(
            RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
        )
        supervisor.engine = _BrokenEngine()  # type: ignore[assignment]
        supervisor._serve_engine(pidfd)
        assert app.wait(timeout=10) == -signal.SIGKILL
        assert supervisor.engine_failed
    finally:
        os.close(pidfd)
        if app.poll() is None:
            app.kill()
            app.wait()


def test_axnet_run_reports_a_failed_engine_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failed(options: RunOptions) -> int:
        raise EngineFailed(
            "the interception engine failed (see the log above); the app was stopped"
        )

    monkeypatch.setattr("axnet._supervisor.run", failed)
    assert _cli.main(["run", "--", "true"]) == 1
    assert capsys.readouterr().err == (
        "axnet run: the interception engine failed (see the log above); the app was stopped\n"
    )


def _service_wire(vip: str, port: int = 80, node: str = "n2") -> list[object]:
    return ["s", vip, port, "192.0.2.9", 20000, node, "b1", "", [], 5, False, 0.0]


def _reattached(supervisor: Supervisor, records: list[list[object]], settling: float) -> None:
    reply = {"vip": "10.1.0.9", "real_host": "127.0.0.1", "block": None, "records": records}
    supervisor._apply_attach({**reply, "settling": settling}, [])


def _served(supervisor: Supervisor, vip: str) -> bool:
    return supervisor.table.resolve(ipaddress.ip_address(vip), 80) is not None


async def test_a_reattach_to_a_settling_daemon_keeps_what_it_lacks_until_it_settles() -> None:
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
    )
    known = [_service_wire(f"10.9.0.{i}") for i in (1, 2, 3)]
    _reattached(supervisor, known, settling=0.0)  # the first attach: nothing to keep
    assert all(_served(supervisor, f"10.9.0.{i}") for i in (1, 2, 3))
    # The daemon restarted: its table has 10.9.0.1 only so far.
    _reattached(supervisor, known[:1], settling=5.0)
    assert all(_served(supervisor, f"10.9.0.{i}") for i in (1, 2, 3))
    # It learns 10.9.0.2, the same record we had: that one is its now.
    supervisor._on_push({"push": "records", "records": [known[1]]})
    await supervisor.forget_carried(supervisor._attaches, 0.0)
    assert [_served(supervisor, f"10.9.0.{i}") for i in (1, 2, 3)] == [True, True, False]
    # A later push of the dropped record is taken: no tombstone was left.
    supervisor._on_push({"push": "records", "records": [known[2]]})
    assert _served(supervisor, "10.9.0.3")


async def test_the_daemons_settled_push_drops_what_was_kept_at_once() -> None:
    # A daemon whose start-up join is slow says it settles in up to 60 s,
    # and then pushes "settled" as soon as its table is whole.
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
    )
    known = [_service_wire(f"10.9.0.{i}") for i in (1, 2)]
    _reattached(supervisor, known, settling=0.0)
    _reattached(supervisor, [], settling=60.0)
    assert all(_served(supervisor, f"10.9.0.{i}") for i in (1, 2))
    supervisor._on_push({"push": "records", "records": [known[0]]})  # the join brought it
    supervisor._on_push({"push": "settled"})
    assert [_served(supervisor, f"10.9.0.{i}") for i in (1, 2)] == [True, False]
    assert supervisor.carried == {}


async def test_withdrawn_records_are_forgotten_as_the_daemon_forgets_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A long-lived app kept the tombstone of every app and service that ever
    # ran in the cluster, where the daemon forgets them after TOMBSTONE_TTL.
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
    )
    now = time.time()
    old, recent = _service_wire("10.9.0.1"), _service_wire("10.9.0.2")
    old[10:] = [True, now - TOMBSTONE_TTL - 1]  # withdrawn, and long ago
    recent[10:] = [True, now - 1]
    _reattached(supervisor, [old, recent], settling=0.0)
    assert len(supervisor.table.services) == 2
    with trio.move_on_after(TOMBSTONE_SWEEP_S * 1.5):
        await supervisor.expire_tombstones()
    assert [str(v.ip) for v in supervisor.table.services] == ["10.9.0.2"]


async def test_a_reattach_keeps_the_names_of_withdrawn_services() -> None:
    # Connections made to a service before it was withdrawn go by its name
    # (ServiceTable.retired_keys), across a re-attach too.
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
    )
    live, gone = _service_wire("10.9.0.1"), _service_wire("10.9.0.1")
    gone[9:] = [6, True, time.time()]
    _reattached(supervisor, [live], settling=0.0)
    supervisor._on_push({"push": "records", "records": [gone]})
    real = RealAddress(host=ipaddress.ip_address("192.0.2.9"), port=20000)
    named = VirtualAddress(ip=ipaddress.ip_address("10.9.0.1"), port=80)
    assert supervisor.table.retired_server(real) == named
    _reattached(supervisor, [gone], settling=0.0)  # the daemon restarted
    assert supervisor.table.retired_server(real) == named


async def test_a_reattach_keeps_the_names_of_withdrawn_apps() -> None:
    # Connections from an app's client port block go by its name after it
    # has gone (ServiceTable.retired_block_keys), across a re-attach too.
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
    )
    live = ["a", "c1", "n2", "10.9.0.7", "192.0.2.9", 40000, 40099, "", [], 5, False, 0.0]
    gone = [*live[:9], 6, True, time.time()]
    _reattached(supervisor, [live], settling=0.0)
    supervisor._on_push({"push": "records", "records": [gone]})
    host = ipaddress.ip_address("192.0.2.9")
    assert supervisor.table.retired_client(host, 40050) == ipaddress.ip_address("10.9.0.7")
    _reattached(supervisor, [gone], settling=0.0)  # the daemon restarted
    assert supervisor.table.retired_client(host, 40050) == ipaddress.ip_address("10.9.0.7")


async def test_a_reattach_to_a_settled_daemon_keeps_nothing() -> None:
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
    )
    _reattached(supervisor, [_service_wire("10.9.0.1")], settling=0.0)
    _reattached(supervisor, [], settling=0.0)  # the session was lost, the daemon lives on
    assert not _served(supervisor, "10.9.0.1")


async def test_only_the_latest_reattach_drops_what_it_kept() -> None:
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
    )
    _reattached(supervisor, [_service_wire("10.9.0.1")], settling=0.0)
    _reattached(supervisor, [], settling=5.0)
    earlier = supervisor._attaches
    _reattached(supervisor, [], settling=5.0)  # the daemon restarted again
    await supervisor.forget_carried(earlier, 0.0)
    assert _served(supervisor, "10.9.0.1")
    await supervisor.forget_carried(supervisor._attaches, 0.0)
    assert not _served(supervisor, "10.9.0.1")


async def test_the_session_answers_a_ping_once_the_pushes_before_it_are_in_the_table() -> None:
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
    )
    ours, daemons = trio.testing.memory_stream_pair()
    session = Session(ours)  # type: ignore[arg-type]  # a SocketStream's part it uses
    answers: list[tuple[object, object, bool]] = []

    def on_push(message: dict[str, object]) -> None:
        supervisor._on_push(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.read, on_push)
        push = {"push": "records", "records": [_service_wire("10.9.0.7")]}
        await daemons.send_all(frame(push) + frame({"push": "ping", "seq": 3}))
        decoder = FrameDecoder()
        with trio.fail_after(10):
            while not answers:
                for message in decoder.feed(bytes(await daemons.receive_some(65536))):
                    answers.append(
                        (message.get("op"), message.get("seq"), _served(supervisor, "10.9.0.7"))
                    )
        await daemons.aclose()
    assert answers == [("applied", 3, True)]


async def test_no_daemon_to_re_attach_to_is_not_called_a_refusal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A daemon killed (or stopped) and not yet back: the supervisor said
    # "re-attach refused reason=no axnet daemon at ..." at every restart.
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=tmp_path)
    )
    ours, theirs = socket.socketpair()
    theirs.close()  # the daemon's end: gone
    session = Session(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    with caplog.at_level(logging.DEBUG, logger="axnet.run"):
        with trio.move_on_after(10):  # attempts with nobody at the socket's path
            await supervisor._keep_session(session)
        (tmp_path / "control.sock").write_bytes(b"")  # a dead daemon's socket
        with trio.move_on_after(10):
            await supervisor._keep_session(session)
    assert "re-attach failed" in caplog.text
    assert "re-attach refused" not in caplog.text


def test_a_large_table_from_the_daemon_is_out_of_the_collectors_full_walk() -> None:
    # A full collection of a 200 000-record table holds the GIL about 0.4 s:
    # every trapped call of the app would wait that long (axnet._heap).
    supervisor = Supervisor(
        RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
    )
    records = [_service_wire(f"10.2.{i >> 8}.{i & 255}") for i in range(12_000)]
    try:
        _reattached(supervisor, records, settling=0)
        walked = {id(o) for o in gc.get_objects()}
        assert len(supervisor.table.services) == 12_000
        assert not any(id(r) in walked for r in supervisor.table.services.values())
        # Pushes, MIN_RECORDS in all (more than a quarter), leave the walk too.
        for lo in range(0, 10_000, 1_000):
            pushed = [_service_wire(f"10.3.{i >> 8}.{i & 255}") for i in range(lo, lo + 1_000)]
            supervisor._on_push({"push": "records", "records": pushed})
        walked = {id(o) for o in gc.get_objects()}
        assert len(supervisor.table.services) == 22_000
        assert not any(id(r) in walked for r in supervisor.table.services.values())
    finally:
        gc.unfreeze()


@pytest.mark.parametrize(
    ("value", "spill"),
    [
        ([57471, 60999], (57471, 60999)),
        (None, None),  # an older daemon: any port past the blocks
        ([60999, 57471], None),
        ([0, 10], None),
        ([1, 65536], None),
        ([1.0, 2], None),
        ([True, 2], None),
        ("57471-60999", None),
        ([1, 2, 3], None),
    ],
)
def test_the_spill_ports_of_an_attach_reply(value: object, spill: tuple[int, int] | None) -> None:
    assert _spill(value) == spill
