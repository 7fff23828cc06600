"""The command line: parsing and validation, with exact messages and exit codes."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from axnet._cli import (
    _COMMANDS,
    EXIT_USAGE,
    _table,
    build_parser,
    main,
    parse_label,
    parse_network,
)
from axnet._control import CONTROL_SOCKET, Connection, serve_control
from axnet._daemonmain import default_client_ports, node_config, port_problem, run_daemon
from axnet._node import PortRange
from axnet._table import ip_address
from axnet._version import __version__


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting a usage error; return the error line of stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: ")
    return err.rstrip("\n").splitlines()[-1]


def test_run_with_a_bad_ip_exits_2_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["run", "--ip", "foo", "--", "true"], capsys)
    assert line.startswith("axnet run: error: ")
    assert line.endswith("--ip must be an IPv4 or IPv6 address, got 'foo'")


def test_a_scoped_address_is_refused_with_why(capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["run", "--ip", "fe80::1%lo", "--", "true"], capsys)
    assert line == "axnet run: error: --ip: 'fe80::1%lo' is a scoped address: give it without '%'"


def test_run_with_a_bad_ip_prints_exactly_the_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _usage_error(["run", "--ip", "foo", "--", "true"], capsys)
    assert line == "axnet run: error: --ip must be an IPv4 or IPv6 address, got 'foo'"


@pytest.mark.parametrize("label", ["novalue", "=v", "a b=c", ""])
def test_run_with_a_bad_label_exits_2(label: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["run", "--label", label, "--", "true"], capsys)
    assert line.endswith(f"--label must look like key=value, got {label!r}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label", "k" * 64 + "=v"], "--label keys may be 63 bytes long and values 255, got "),
        (["--label", "k=" + "é" * 128], "--label keys may be 63 bytes long and values 255, got "),
        (["--name", "n" * 256], "--name may be 255 bytes long, got 256"),
    ],
)
def test_run_with_an_oversized_name_or_label_exits_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Peers refuse records with longer texts: refused here, not half published.
    line = _usage_error(["run", *args, "--", "true"], capsys)
    assert line.startswith(f"axnet run: error: {message}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "web\x1b[2J"], "--name may not contain control characters, got 'web\\x1b[2J'"),
        (["--label", "k=a\nb"], "--label may not contain control characters, got 'k=a\\nb'"),
    ],
)
def test_run_with_control_characters_exits_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Names and labels reach other users' terminals and logs: peers refuse them.
    line = _usage_error(["run", *args, "--", "true"], capsys)
    assert line == f"axnet run: error: {message}"


@pytest.mark.parametrize("value", ["-1", "10001", "1.5", "fast", ""])
def test_run_with_a_bad_busy_poll_exits_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["run", "--busy-poll", value, "--", "true"], capsys)
    assert line == (
        "axnet run: error: --busy-poll must be a whole number of microseconds "
        f"from 0 to 10000, got {value!r}"
    )


@pytest.mark.parametrize(("argv", "us"), [([], 250), (["--busy-poll", "0"], 0)])
def test_run_busy_polls_250_us_unless_told(argv: list[str], us: int) -> None:
    assert build_parser().parse_args(["run", *argv, "--", "a"]).busy_poll == us


def test_run_with_too_many_labels_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    labels = [arg for i in range(33) for arg in ("--label", f"k{i}=v")]
    assert main(["run", *labels, "--", "true"]) == EXIT_USAGE
    assert capsys.readouterr().err == "axnet run: at most 32 --label, got 33\n"


def test_daemon_with_a_bad_virtual_range_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["daemon", "--virtual-range", "10.0.0/x"], capsys)
    assert line.endswith("--virtual-range must be a network like 10.77.0.0/16, got '10.0.0/x'")


def test_daemon_with_a_bad_address_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["daemon", "--address", "host"], capsys)
    assert line.endswith("--address must be an IPv4 or IPv6 address, got 'host'")


@pytest.mark.parametrize(
    "argv", [["status", "--bogus"], ["services", "extra"], ["keygen", "--json"]]
)
def test_a_commands_unknown_argument_shows_that_commands_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"usage: axnet {argv[0]} ")
    assert err.rstrip().endswith(f"axnet {argv[0]}: error: unrecognized arguments: {argv[1]}")


@pytest.mark.parametrize(
    "argv", [["-v", "status"], ["-vv", "run"], ["--json", "services", "--json"]]
)
def test_a_commands_option_given_before_it_is_said_to_go_after(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Not "axnet status: error: unrecognized arguments: -v", which status has.
    line = _usage_error(argv, capsys)
    assert line == (
        f"axnet: error: {argv[0]}: options go after the command (axnet {argv[1]} {argv[0]} …)"
    )


def test_an_unknown_option_before_a_command_is_not_said_to_go_after(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _usage_error(["--bogus", "status"], capsys)
    assert line == "axnet status: error: unrecognized arguments: --bogus"


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["frobnicate"], capsys)
    assert "invalid choice: 'frobnicate'" in line


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    out = capsys.readouterr().out
    assert out.startswith("usage: axnet")
    for command in ("daemon", "run", "services", "apps", "members", "status", "stop", "join"):
        assert command in out


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (
            "daemon",
            [
                "--name",
                "--address",
                "--listen-ports",
                "--client-ports",
                "--client-block",
                "--virtual-range",
                "--bind",
                "--advertise",
                "--join",
                "--gossip-key-file",
                "--profile",
                "--label",
                "--runtime-dir",
                "--verbose",
            ],
        ),
        ("run", ["--ip", "--name", "--label", "--runtime-dir", "--verbose", "--busy-poll"]),
        ("services", ["--json", "--runtime-dir"]),
        ("apps", ["--json", "--runtime-dir"]),
        ("members", ["--json", "--runtime-dir"]),
        ("status", ["--json", "--runtime-dir"]),
        ("stop", ["--runtime-dir"]),
        ("join", ["SEED", "--runtime-dir"]),
        ("leave", ["--runtime-dir"]),
        ("keygen", []),
        ("demo", ["--json", "--verbose"]),
    ],
)
def test_help_of_each_command_mentions_its_flags(
    command: str, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: axnet {command}")
    for flag in flags:
        assert flag in out


def test_run_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "axnet run --ip 10.77.0.5" in capsys.readouterr().out


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # as wrapped for any width


def test_help_says_what_each_exit_status_means(capsys: pytest.CaptureFixture[str]) -> None:
    # A script needs to know what to test for; a shell's conventions, said.
    top = _help([], capsys)
    assert "Exit status: 0 done, 1 failed (no daemon runs, or it refused" in top
    assert "2 usage error, 130 Ctrl-C (the daemon's normal stop: 0); axnet run exits" in top
    run = _help(["run"], capsys)
    assert "exit status: the app's; when a signal ended the app" in run
    assert "a shell reports 128+N" in run
    for status in ("127 when the program is not found", "126 when it cannot be executed"):
        assert status in run
    assert "125 when axnet run cannot intercept or start it, 1 when no daemon runs" in run


def test_stop_and_status_help_say_what_no_daemon_means(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Scripts test these: one succeeds without a daemon, the other fails.
    assert "With no daemon running it says so and exits 0." in _help(["stop"], capsys)
    assert "Exits 1 when none runs (after --wait)." in _help(["status"], capsys)


def test_daemon_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(["daemon"], capsys)
    assert "examples: axnet daemon & # this host alone" in out
    assert "axnet daemon --advertise 10.0.0.2 --gossip-key-file key --join 10.0.0.1 &" in out


def test_join_help_gives_the_default_port_and_an_example(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _help(["join"], capsys)
    assert "HOST[:PORT] of a member's gossip address (default port: 7946)" in out
    assert "example: axnet join 10.0.0.1" in out
    assert "Exits 1 when no seed answered" in out


def test_run_parses_labels_ip_and_program() -> None:
    args = build_parser().parse_args(
        ["run", "--ip", "::ffff:10.1.0.5", "--label", "tier=web", "--label", "x=", "--", "a", "-b"]
    )
    assert args.ip == ipaddress.IPv4Address("10.1.0.5")
    assert args.label == [("tier", "web"), ("x", "")]
    assert args.argv == ["--", "a", "-b"]


@pytest.fixture
def _restore_axnet_logger() -> Iterator[None]:
    """main() points the axnet logger at the stderr of the moment (capsys's)."""
    logger = logging.getLogger("axnet")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.usefixtures("_restore_axnet_logger")
def test_run_without_a_program_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--"]) == EXIT_USAGE
    assert "name the program to run after '--'" in capsys.readouterr().err


def test_parse_label_keeps_equals_in_the_value() -> None:
    assert parse_label("k=a=b") == ("k", "a=b")


def test_parse_network_is_not_strict_about_host_bits() -> None:
    assert parse_network("10.77.1.2/16") == ipaddress.ip_network("10.77.0.0/16")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_network("nope")


# -- daemon configuration ----------------------------------------------------------


def daemon_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["daemon", "--name", "n1", *extra])


def test_node_config_defaults() -> None:
    config = node_config(daemon_args())
    assert config.name == "n1"
    assert config.real_host == ip_address("127.0.0.1")
    assert config.listen_ports == PortRange(lo=20000, hi=32767)
    # Source ports default to the kernel's whole ephemeral range.
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert config.client_ports == PortRange(lo=lo, hi=hi)
    assert config.client_block == 256
    assert config.virtual_range == ipaddress.ip_network("10.77.0.0/16")


@pytest.mark.parametrize(
    ("advertise", "host"),
    [("10.0.0.7", "10.0.0.7"), ("10.0.0.7:7946", "10.0.0.7"), ("fd00::7", "fd00::7")],
)
def test_node_config_address_from_advertise(advertise: str, host: str) -> None:
    assert node_config(daemon_args("--advertise", advertise)).real_host == ip_address(host)


def test_node_config_address_from_bracketed_ipv6_advertise() -> None:
    config = node_config(daemon_args("--advertise", "[fd00::7]:7946"))
    assert config.real_host == ip_address("fd00::7")


def test_node_config_address_from_the_gossip_host() -> None:
    config = node_config(daemon_args(), gossip_host="10.0.0.8")
    assert config.real_host == ip_address("10.0.0.8")


def test_daemon_labels_parse() -> None:
    assert daemon_args("--label", "zone=a").label == [("zone", "a")]


def test_node_config_address_wins_over_advertise() -> None:
    config = node_config(daemon_args("--address", "10.0.0.1", "--advertise", "10.0.0.7"))
    assert config.real_host == ip_address("10.0.0.1")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--advertise", "myhost:7946"],
            "--advertise must be HOST[:PORT] with an IP host, got 'myhost:7946'",
        ),
        (
            ["--listen-ports", "20000-40000", "--client-ports", "32768-60999"],
            "--listen-ports and --client-ports must not overlap",
        ),
        (
            ["--listen-ports", "1000-2000", "--client-ports", "2000-3000"],
            "--listen-ports and --client-ports must not overlap",
        ),
        (
            ["--listen-ports", "5000-6000", "--client-ports", "1000-5000"],
            "--listen-ports and --client-ports must not overlap",
        ),
        (["--listen-ports", "x"], "--listen-ports must look like 20000-32767, got 'x'"),
        (["--client-ports", "9-"], "--client-ports must look like 20000-32767, got '9-'"),
        (["--client-block", "15"], "--client-block must be between 16 and 28232, got 15"),
        (
            ["--client-ports", "40000-40099", "--client-block", "101"],
            "--client-block must be between 16 and 100, got 101",
        ),
    ],
)
def test_node_config_validation(extra: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        node_config(daemon_args(*extra))
    assert str(info.value) == message


def test_node_config_accepts_adjacent_ranges_and_edge_blocks() -> None:
    config = node_config(
        daemon_args(
            "--listen-ports", "1000-1999", "--client-ports", "2000-2015", "--client-block", "16"
        )
    )
    assert len(config.client_ports) == config.client_block == 16


def test_run_daemon_reports_bad_flags_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ("--listen-ports", "20000-40000", "--client-ports", "32768-60999")
    assert run_daemon(daemon_args(*flags)) == 2
    assert capsys.readouterr().err == (
        "axnet daemon: --listen-ports and --client-ports must not overlap\n"
    )


@pytest.mark.parametrize("flags", [["--label", "zone=a"], ["--profile", "wan"]])
def test_gossip_settings_without_gossip_are_refused(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_daemon(daemon_args(*flags)) == 2
    assert capsys.readouterr().err == (
        "axnet daemon: --label and --profile are gossip settings, and this daemon does not "
        "gossip; add --advertise IP (or --bind, --join) to cluster\n"
    )


@pytest.mark.parametrize(
    "ip", ["127.0.0.1", "0.0.0.0", "224.0.0.1", "169.254.1.1", "::1", "fe80::1"]
)
def test_run_refuses_an_ip_an_app_cannot_own(ip: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["run", "--ip", ip, "--", "true"], capsys)
    assert f": error: --ip {ip} cannot be a virtual IP: it overlaps " in line


def test_daemon_refuses_a_virtual_range_over_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["daemon", "--virtual-range", "127.0.0.0/24"], capsys)
    assert (
        ": error: --virtual-range 127.0.0.0/24 cannot hold virtual IPs: it overlaps 127.0.0.0/8"
        in line
    )


@pytest.mark.parametrize("network", ["10.9.0.0/31", "10.9.0.7/32", "fd00::/127"])
def test_daemon_refuses_a_virtual_range_with_no_room(
    network: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _usage_error(["daemon", "--virtual-range", network], capsys)
    assert line.endswith(
        f"--virtual-range {network} cannot hold virtual IPs: it is too small: "
        "give it at least 4 addresses (a /30, or /126 for IPv6)"
    )
    assert parse_network("10.9.0.0/30").num_addresses == 4


def test_client_ports_default_to_the_ephemeral_range_above_the_listeners() -> None:
    listen = PortRange(lo=20000, hi=32767)
    assert default_client_ports(listen, PortRange(lo=32768, hi=60999)) == PortRange(
        lo=32768, hi=60999
    )
    # A wide range (1024-65535) holds the listener ports too: the part above them.
    assert default_client_ports(listen, PortRange(lo=1024, hi=65535)) == PortRange(
        lo=32768, hi=65535
    )
    assert default_client_ports(listen, None) == PortRange(lo=32768, hi=60999)
    with pytest.raises(ValueError, match="leave none above --listen-ports 20000-32767"):
        default_client_ports(listen, PortRange(lo=20000, hi=30000))


def test_port_ranges_the_kernel_would_defeat_are_refused() -> None:
    listen, client = PortRange(lo=20000, hi=32767), PortRange(lo=32768, hi=60999)
    ephemeral = PortRange(lo=32768, hi=60999)
    assert port_problem(listen, client, ephemeral, 1024) is None
    assert port_problem(listen, client, None, 1024) is None  # cannot tell: bind says
    outside = port_problem(listen, PortRange(lo=1000, hi=1100), ephemeral, 1024)
    assert outside == (
        "--client-ports 1000-1100 must lie within the kernel's ephemeral ports 32768-60999 "
        "(net.ipv4.ip_local_port_range), or servers see this node's address instead of "
        "apps' virtual IPs"
    )
    low = port_problem(PortRange(lo=80, hi=90), client, ephemeral, 1024)
    assert low == (
        "--listen-ports 80-90 starts below 1024, the lowest port this user may bind "
        "(net.ipv4.ip_unprivileged_port_start); apps still get port 80 and any other: "
        "pick ports from 1024 up"
    )
    assert port_problem(PortRange(lo=80, hi=90), client, ephemeral, 1) is None


def test_run_daemon_refuses_client_ports_outside_the_ephemeral_range(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_daemon(daemon_args("--client-ports", "1000-1100", "--client-block", "16")) == 2
    assert capsys.readouterr().err.startswith("axnet daemon: --client-ports 1000-1100 must lie")


def test_tables_show_values_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    _table("t", ["virtual", "name"], [["[fd00::5]:80", "[bold]web"]])
    out = capsys.readouterr().out
    assert "[fd00::5]:80" in out
    assert "[bold]web" in out


def test_daemon_refuses_an_address_that_is_not_this_hosts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_daemon(daemon_args("--address", "192.0.2.77")) == 2
    assert capsys.readouterr().err == (
        "axnet daemon: apps' listeners are bound to 192.0.2.77 and it cannot be bound here "
        "(Cannot assign requested address); give --address (or --advertise) an address of "
        "this host\n"
    )


def test_join_with_a_malformed_seed_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["join", "host:notaport"]) == EXIT_USAGE
    assert capsys.readouterr().err == (
        "axnet join: SEED must be HOST[:PORT], got 'host:notaport'\n"
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("axnet ")


def test_class_e_is_a_fine_virtual_range() -> None:
    # Nothing real lives in 240.0.0.0/4, and virtual IPs never reach a wire.
    assert str(parse_network("240.1.0.0/16")) == "240.1.0.0/16"


def test_daemon_refuses_a_name_too_long_to_gossip(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_daemon(daemon_args("--name", "é" * 200)) == 2
    assert capsys.readouterr().err == (
        "axnet daemon: --name must be at most 255 bytes of UTF-8, got 400\n"
    )


def test_daemon_refuses_an_empty_name(capsys: pytest.CaptureFixture[str]) -> None:
    # Before, it took the host name, as if --name had not been given.
    assert run_daemon(daemon_args("--name", "")) == 2
    assert capsys.readouterr().err == (
        "axnet daemon: --name must not be empty (without it: the host name)\n"
    )


def test_daemon_refuses_a_name_with_control_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_daemon(daemon_args("--name", "n\x1b]0;x\x07")) == 2
    assert capsys.readouterr().err == (
        "axnet daemon: --name may not contain control characters, got 'n\\x1b]0;x\\x07'\n"
    )


def test_ctrl_c_wrapped_by_trio_exits_130_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise BaseExceptionGroup("nursery", [KeyboardInterrupt()])

    monkeypatch.setitem(_COMMANDS, "keygen", interrupted)
    assert main(["keygen"]) == 130
    assert capsys.readouterr().err == ""

    def failed(args: argparse.Namespace) -> int:
        raise BaseExceptionGroup("nursery", [KeyboardInterrupt(), OSError("real trouble")])

    monkeypatch.setitem(_COMMANDS, "keygen", failed)
    with pytest.raises(BaseExceptionGroup):
        main(["keygen"])  # a real error is not hidden behind the Ctrl-C


def test_ctrl_c_while_the_command_still_loads_exits_130_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Loading takes a good part of a second: Ctrl-C meanwhile came out as a
    # traceback from somewhere in an import.
    import importlib.abc

    from axnet import _entry

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object, target: object = None) -> None:
            if name == "axnet._cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "axnet._cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    assert _entry.main() == 130


def test_a_reader_gone_early_ends_output_quietly() -> None:
    # `axnet keygen | head -c0`: the pipe is closed before anything is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    done = subprocess.run(
        [sys.executable, "-m", "axnet", "keygen"],
        check=False,
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


# -- a daemon of an older version (the CLI may be upgraded first) ----------------

#: The lone member of a daemon that does not gossip, as daemons of earlier
#: versions listed it: no gossip key at all (c2fca33), then gossip "" (to
#: 651df04); this version's gives both gossip and incarnation, null.
_OLDER_LONE_MEMBERS = [
    {"name": "n1", "address": "127.0.0.1", "status": "alive", "labels": {}},
    {"name": "n1", "address": "127.0.0.1", "gossip": "", "status": "alive", "labels": {}},
]


@pytest.mark.parametrize("member", _OLDER_LONE_MEMBERS)
async def test_members_json_of_an_older_daemon_has_this_versions_keys(
    member: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    async def older_daemon(conn: Connection, _: Mapping[str, Any]) -> None:
        async for message in conn.messages():
            await conn.reply(message, members=[member])

    runtime = Path(tempfile.mkdtemp(prefix="axcli-"))  # short: a unix socket's path
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, runtime / CONTROL_SOCKET, older_daemon)
            argv = ["members", "--json", "--runtime-dir", str(runtime)]
            status = await trio.to_thread.run_sync(main, argv)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert status == 0
    assert json.loads(capsys.readouterr().out) == [
        {
            "name": "n1",
            "address": "127.0.0.1",
            "gossip": None,
            "incarnation": None,
            "status": "alive",
            "labels": {},
        }
    ]


async def test_leave_of_an_older_daemon_without_gossip_is_refused_not_said_done(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A daemon before f1bff20 answered a leave OK though it does not gossip.
    asked: list[object] = []

    async def older_daemon(conn: Connection, _: Mapping[str, Any]) -> None:
        async for message in conn.messages():
            asked.append(message.get("op"))
            if message.get("op") == "status":
                await conn.reply(message, node="n1", gossip=None)
            else:
                await conn.reply(message)

    runtime = Path(tempfile.mkdtemp(prefix="axcli-"))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, runtime / CONTROL_SOCKET, older_daemon)
            argv = ["leave", "--runtime-dir", str(runtime)]
            status = await trio.to_thread.run_sync(main, argv)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    out = capsys.readouterr()
    assert (status, out.out) == (1, "")
    assert out.err == (
        "axnet leave: this daemon runs without gossip; restart it with "
        "'axnet daemon --advertise IP' (and --gossip-key-file) to cluster\n"
    )
    assert "leave" not in asked


@pytest.mark.parametrize(
    ("reply", "shown", "in_json"),
    [
        ({"node": "n1"}, "unknown (a daemon from before status said it)", None),
        ({"node": "n1", "version": "0.0.9"}, "0.0.9", "0.0.9"),
        ({"node": "n1", "version": __version__}, __version__, __version__),
    ],
)
async def test_status_says_which_version_the_daemon_runs(
    reply: dict[str, Any], shown: str, in_json: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    # A daemon runs on after an upgrade until it is restarted: status says
    # its version, and, where it is not the CLI's, how to make them one.
    async def daemon(conn: Connection, _: Mapping[str, Any]) -> None:
        async for message in conn.messages():
            await conn.reply(message, **reply)

    runtime = Path(tempfile.mkdtemp(prefix="axcli-"))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, runtime / CONTROL_SOCKET, daemon)
            for argv in (["status"], ["status", "--json"]):
                status = await trio.to_thread.run_sync(main, [*argv, "--runtime-dir", str(runtime)])
                assert status == 0
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    text, as_json = capsys.readouterr().out.split("\n{", 1)
    assert json.loads("{" + as_json)["version"] == in_json
    version_line = next(line for line in text.splitlines() if line.startswith("version: "))
    if in_json == __version__:
        assert version_line == f"version: {shown}"
    else:
        assert version_line == (
            f"version: {shown}; this CLI is axnet {__version__}: restart the daemon to run the same"
        )
