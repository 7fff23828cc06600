"""Command line: argument parsing only; the work happens in the daemon and supervisor."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import ipaddress
import json
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._control import (
    NO_GOSSIP,
    ControlClient,
    ControlError,
    DaemonUnavailable,
    control_path,
    runtime_dir,
)
from ._entry import EXIT_INTERRUPTED
from ._groups import first_of
from ._node import MAX_BLOCKS
from ._stderr import StderrHandler
from ._table import IPAddress, Labels, ip_address, labels_from, reserved_reason
from ._version import __version__
from ._wire import (
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    MAX_LABELS,
    MAX_TEXT_BYTES,
    has_control,
    visible,
)

#: `axnet status --wait`: its bound, and how often it looks.
MAX_WAIT_S = 3600.0
WAIT_POLL_S = 0.05

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE
#: What a write of the output can fail with, beside a closed pipe.
_OUTPUT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)

_EPILOG_RUN = """\
examples:
  axnet run --ip 10.77.0.5 --name web --label tier=web -- python3 -m http.server 80
  axnet run --label tier=client -- curl http://10.77.0.5/

The app keeps its own port numbers: a bind to its virtual IP, 0.0.0.0 or ::
is carried out on a real port of this node, and getsockname shows the
virtual address.  axnet run needs a daemon: start one with 'axnet daemon'.

exit status: the app's; when a signal ended the app, axnet run ends by that
signal too (a shell reports 128+N).  Before the app runs: 127 when the
program is not found, 126 when it cannot be executed, 125 when axnet run
cannot intercept or start it, 1 when no daemon runs, it refused the app or
the supervisor failed, 2 for a usage error.
"""

_EPILOG_DAEMON = """\
examples:
  axnet daemon &                  # this host alone; then: axnet status --wait 10
  (umask 077; axnet keygen > key)
  axnet daemon --advertise 10.0.0.1 --gossip-key-file key &
  axnet daemon --advertise 10.0.0.2 --gossip-key-file key --join 10.0.0.1 &  # another host
"""


#: ``axnet run --busy-poll``: µs the supervisor polls, without sleeping, for
#: the connection a parked accept waits for, and for the app's next call
#: after an answer.  bench/core.py: C round trips 16 to 24 µs faster than
#: with 0 in three runs of four (2 in the fourth).  Not 100: a Python
#: client's next connect comes 75 to 100 µs after its last was answered
#: while the loops poll, and 100 to 175 once they sleep, so with 100 the
#: windows closed for Python pairs (see _fastpath.c); with 250 they catch
#: 96 to 100 % of what they wait for, C pairs too.
BUSY_POLL_US = 250
MAX_BUSY_POLL_US = 10_000


class LogFormatter(logging.Formatter):
    """``axnet: level=info logger=axnet.run msg key=value …``"""

    def format(self, record: logging.LogRecord) -> str:
        return f"axnet: level={record.levelname.lower()} {record.name} {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else ""
        )


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = StderrHandler()
    handler.setFormatter(LogFormatter())
    root = logging.getLogger("axnet")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# -- validation (exact messages, exit code 2) -----------------------------------


def _number_upto(text: str, convert: Callable[[str], float], most: float) -> float | None:
    """*text* as a number from 0 to *most*, or None."""
    try:
        value = convert(text)
    except ValueError:
        return None
    return value if 0 <= value <= most else None


def parse_wait(text: str) -> float:
    """``--wait``: seconds, 0 to an hour."""
    seconds = _number_upto(text, float, MAX_WAIT_S)
    if seconds is None:
        raise argparse.ArgumentTypeError(
            f"--wait must be seconds from 0 to {MAX_WAIT_S:.0f}, got {text!r}"
        )
    return seconds


def parse_ip(text: str, *, flag: str) -> IPAddress:
    try:
        return ip_address(text)
    except ValueError as exc:
        if "scoped" in str(exc):  # fe80::1%eth0: an address, but not one to share
            raise argparse.ArgumentTypeError(f"{flag}: {exc}") from None
        raise argparse.ArgumentTypeError(
            f"{flag} must be an IPv4 or IPv6 address, got {text!r}"
        ) from None


def parse_virtual_ip(text: str) -> IPAddress:
    """``--ip``: an address an app can own (not loopback, multicast, …)."""
    ip = parse_ip(text, flag="--ip")
    reason = reserved_reason(ip)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"--ip {text} cannot be a virtual IP: {reason}")
    return ip


def _utf8_len(text: str) -> int:
    return len(text.encode(errors="surrogateescape"))


def _printable(text: str, flag: str) -> str:
    """*text*, unless it holds a control character (they never travel: they
    would reach other users' terminals and logs)."""
    if has_control(text):
        raise argparse.ArgumentTypeError(f"{flag} may not contain control characters, got {text!r}")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{flag} must be UTF-8 text, got {visible(text)!r}"
        ) from None
    return text


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = _printable(text, "--label").partition("=")
    if not sep or not key or any(c.isspace() for c in key):
        raise argparse.ArgumentTypeError(f"--label must look like key=value, got {text!r}")
    if _utf8_len(key) > MAX_LABEL_KEY_BYTES or _utf8_len(value) > MAX_LABEL_VALUE_BYTES:
        raise argparse.ArgumentTypeError(
            f"--label keys may be {MAX_LABEL_KEY_BYTES} bytes long and values "
            f"{MAX_LABEL_VALUE_BYTES}, got {text!r}"
        )
    return key, value


def parse_name(text: str) -> str:
    """``--name``: a service or node name, at most MAX_TEXT_BYTES bytes."""
    _printable(text, "--name")
    if _utf8_len(text) > MAX_TEXT_BYTES:
        raise argparse.ArgumentTypeError(
            f"--name may be {MAX_TEXT_BYTES} bytes long, got {_utf8_len(text)}"
        )
    return text


def parse_busy_poll(text: str) -> int:
    us = _number_upto(text, int, MAX_BUSY_POLL_US)
    if us is None:
        raise argparse.ArgumentTypeError(
            f"--busy-poll must be a whole number of microseconds from 0 to "
            f"{MAX_BUSY_POLL_US}, got {text!r}"
        )
    return int(us)


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--virtual-range must be a network like 10.77.0.0/16, got {text!r}"
        ) from None
    reason = reserved_reason(network)
    if reason is None and network.num_addresses < 4:
        # Apps never get the network's first and last addresses.
        reason = "it is too small: give it at least 4 addresses (a /30, or /126 for IPv6)"
    if reason is not None:
        raise argparse.ArgumentTypeError(
            f"--virtual-range {text} cannot hold virtual IPs: {reason}"
        )
    return network


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Our validators name their flag already: "argument --ip: --ip must be…" → "--ip must be…"
        message = re.sub(r"^argument [^:]+: (?=-)", "", message)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime-dir",
        metavar="DIR",
        help="directory of the daemon's control socket "
        "(default: $AXNET_RUNTIME_DIR, $XDG_RUNTIME_DIR/axnet or /tmp/axnet-UID)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="axnet",
        description="Container networking for unprivileged apps: virtual IPs, any port, "
        "a cluster-wide service table, with no root and no proxy on the data path.",
    )
    parser.add_argument("--version", action="version", version=f"axnet {__version__}")
    parser.epilog = (
        "'axnet COMMAND --help' tells more of each. Start with: axnet daemon &, then "
        "axnet run --ip 10.77.0.5 -- python3 -m http.server 80 (or axnet demo). "
        "Exit status: 0 done, 1 failed (no daemon runs, or it refused: stderr says why), "
        "2 usage error, 130 Ctrl-C (the daemon's normal stop: 0); axnet run exits with its "
        "app's status."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser(
        "daemon",
        help="run this host's node",
        description=textwrap.fill(
            "Run this host's node, in the foreground, until Ctrl-C, SIGTERM or "
            "'axnet stop'; apps under 'axnet run' keep running across a restart and "
            "re-attach. One per user and host. It says 'ready' on stderr when apps may "
            "start. Without --advertise, --bind or --join it serves this host alone; with "
            "them it gossips with other nodes (port 7946 unless given).",
            width=79,
        ),
        epilog=_EPILOG_DAEMON,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(d)
    d.add_argument("--name", help="node name (default: the host name)")
    d.add_argument(
        "--address",
        type=lambda t: parse_ip(t, flag="--address"),
        help="this node's real address, where virtual listeners are bound "
        "(default: the --advertise address, else 127.0.0.1)",
    )
    d.add_argument(
        "--listen-ports",
        default="20000-32767",
        metavar="LO-HI",
        help="real ports for virtual listeners (default: %(default)s)",
    )
    d.add_argument(
        "--client-ports",
        metavar="LO-HI",
        help="source ports for apps' connections, inside net.ipv4.ip_local_port_range "
        "(default: that range, above --listen-ports where they meet)",
    )
    d.add_argument(
        "--client-block",
        type=int,
        default=256,
        metavar="N",
        help=f"source ports per block: an app gets one, and up to {MAX_BLOCKS - 1} more as "
        "it uses them up (default: %(default)s)",
    )
    d.add_argument(
        "--virtual-range",
        type=parse_network,
        default=ipaddress.ip_network("10.77.0.0/16"),
        metavar="CIDR",
        help="addresses for apps started without --ip (default: %(default)s)",
    )
    _gossip_flags(d)

    r = sub.add_parser(
        "run",
        help="run an app with its own virtual IP",
        description=textwrap.fill(
            "Run an unmodified app with its own virtual IP, any TCP port, and the "
            "cluster's services reachable by their virtual addresses (TCP over IPv4 and "
            "IPv6; UDP and other sockets are left to the kernel).",
            width=79,
        ),
        epilog=_EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(r)
    r.add_argument(
        "--ip",
        type=parse_virtual_ip,
        help="the app's virtual IP (default: one from the node's virtual range)",
    )
    r.add_argument("--name", default="", type=parse_name, help="service name")
    r.add_argument(
        "--label",
        action="append",
        type=parse_label,
        default=[],
        metavar="KEY=VALUE",
        help="a label (repeatable)",
    )
    r.add_argument(
        "--busy-poll",
        type=parse_busy_poll,
        default=BUSY_POLL_US,
        metavar="USEC",
        help="after the app's accept finds no connection, poll for one this long before "
        "sleeping, and as long for the app's next call after each answer: what follows "
        "quickly is served sooner, for at most this much CPU per wait; each window shrinks "
        f"by itself while what it waits for comes later (0: never poll; default {BUSY_POLL_US})",
    )
    r.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- PROGRAM [ARGS]",
        help="the app, and its arguments, after '--'",
    )

    for name, text in (
        ("services", "list the cluster's services"),
        ("apps", "list apps and their virtual IPs"),
        ("members", "list the cluster's members"),
        ("status", "show this node's daemon"),
    ):
        c = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _common(c)
        c.add_argument("--json", action="store_true", help="machine-readable output")
    status = sub.choices["status"]
    status.add_argument(
        "--wait",
        type=parse_wait,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for a daemon that is starting (in a script: "
        "'axnet daemon & axnet status --wait 10'; default: do not wait)",
    )
    status.description = "Show this node's daemon. Exits 1 when none runs (after --wait)."

    s = sub.add_parser(
        "stop",
        help="stop this node's daemon",
        description="Stop this node's daemon. Apps under 'axnet run' keep running and "
        "re-attach to the next daemon. With no daemon running it says so and exits 0.",
    )
    _common(s)

    j = sub.add_parser(
        "join",
        help="join a cluster through a seed",
        description="Join a cluster: exchange state with a member, through its gossip "
        "address, and from then on gossip with every member. The daemon must gossip "
        "itself (axnet daemon --advertise IP). Exits 1 when no seed answered, or when "
        "another member has this node's name.",
        epilog="example: axnet join 10.0.0.1 10.0.0.2:7947",
    )
    _common(j)
    j.add_argument(
        "seeds",
        nargs="+",
        metavar="SEED",
        help="HOST[:PORT] of a member's gossip address (default port: 7946)",
    )

    lv = sub.add_parser(
        "leave",
        help="leave the cluster gracefully",
        description="Leave the cluster: the other members withdraw this node's services. "
        "The daemon runs on, out of the cluster, its table as it was; "
        "'axnet join SEED' rejoins, 'axnet stop' stops it.",
    )
    _common(lv)

    k = sub.add_parser(
        "keygen",
        help="print a new gossip key",
        description="Print a new random gossip key (base64, AES-256). Keep it private: "
        "(umask 077; axnet keygen > gossip.key).",
    )
    k.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)

    demo = sub.add_parser(
        "demo",
        help="a local cluster showing what axnet does",
        description="Start a local cluster: three nodes (daemons on 127.0.0.11 to .13, "
        "gossiping), a web server on port 80 at a virtual IP on each of two of them, and a "
        "client on the third that fetches from both. Then the second node leaves and its "
        "service goes. Print what each side saw; stop everything.",
    )
    demo.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    demo.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def _gossip_flags(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "--bind",
        metavar="HOST:PORT",
        default=None,
        help="gossip address to listen on (default when clustering: 0.0.0.0:7946, or "
        "[::]:7946 for an IPv6 --advertise or --address)",
    )
    d.add_argument(
        "--advertise",
        metavar="HOST[:PORT]",
        default=None,
        help="gossip address other members use to reach this node",
    )
    d.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="SEED",
        help="join the cluster through this member (repeatable; retried with backoff)",
    )
    d.add_argument(
        "--gossip-key-file",
        metavar="FILE",
        type=Path,
        help="file with base64 AES keys, one a line; the first encrypts",
    )
    d.add_argument(
        "--profile",
        choices=("lan", "wan", "local"),
        default=None,
        help="gossip timing preset (default: lan)",
    )
    d.add_argument(
        "--label",
        action="append",
        type=parse_label,
        default=[],
        metavar="KEY=VALUE",
        help="a label of this node, shown by 'axnet members' (repeatable)",
    )


# -- commands -------------------------------------------------------------------


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(control_path(runtime_dir(args.runtime_dir)))


def _print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


#: Columns of a table written into a pipe or a file: as wide as it needs.
PIPED_WIDTH = 100_000


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for column in columns:
        # Folded onto more lines where the terminal is narrow, never cut:
        # half an address is a wrong one.
        table.add_column(column, overflow="fold")
    for row in rows:
        # Text, not markup: an address like [fd00::5]:80 or a label with
        # brackets is shown as it is.
        table.add_row(*(Text("" if v is None else visible(str(v))) for v in row))
    # Into a pipe or a file, one line a row, however long (for grep).
    Console(width=None if sys.stdout.isatty() else PIPED_WIDTH).print(table)


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _words(values: list[str]) -> str:
    return " ".join(values)


def _member_now(member: Mapping[str, Any]) -> dict[str, Any]:
    """A member as this version's daemon lists it, from a daemon of any
    version (the CLI may be upgraded first): older ones give a member of a
    daemon that does not gossip ``gossip: ""`` or no gossip key, and no
    incarnation key; this version gives both, null."""
    return {
        **member,
        "gossip": member.get("gossip") or None,
        "incarnation": member.get("incarnation"),
        "labels": member.get("labels") or {},
    }


#: For each listing: the reply's key, the table's columns, and how a row reads.
_LISTINGS: dict[str, tuple[str, list[str], Any]] = {
    "services": (
        "services",
        ["virtual", "real", "node", "name", "labels"],
        lambda s: [s["virtual"], s["real"], s["node"], s["name"], _labels_text(s["labels"])],
    ),
    "apps": (
        "apps",
        ["vip", "node", "name", "pid", "listening", "command", "labels"],
        lambda a: [
            a["vip"],
            a["node"],
            a["name"],
            a["pid"],
            _words(a["listening"]),
            a["command"],
            _labels_text(a["labels"]),
        ],
    ),
    "members": (
        "members",
        ["name", "address", "gossip", "status", "labels"],
        lambda m: [
            m["name"],
            m["address"],
            m["gossip"] or "",  # null: it does not gossip
            m["status"],
            _labels_text(m["labels"]),
        ],
    ),
}


def _waiting_client(args: argparse.Namespace) -> ControlClient:
    """A client of a daemon that may still be starting (``--wait``)."""
    give_up = time.monotonic() + getattr(args, "wait", 0.0)
    while True:
        try:
            return _client(args)
        except DaemonUnavailable as exc:
            if not exc.nobody_listens:
                raise
            if time.monotonic() >= give_up:
                raise
        time.sleep(WAIT_POLL_S)


def cmd_listing(args: argparse.Namespace) -> int:
    with _waiting_client(args) as client:
        reply = client.request(args.command)
    if args.command in _LISTINGS:
        key, columns, row = _LISTINGS[args.command]
        items = reply[key]
        if args.command == "members":
            items = [_member_now(item) for item in items]
        if args.json:
            _print_json(items)
        else:
            _table(args.command, columns, [row(item) for item in items])
        return 0
    status = {k: v for k, v in reply.items() if k not in ("id", "ok")}
    status.setdefault("version", None)  # a daemon older than the field
    if args.json:
        _print_json(status)
        return 0
    status["version"] = _daemon_version(status["version"])
    if status.get("uptime") is not None:
        status["uptime"] = f"{float(status['uptime']):.0f} s"
    if status.get("gossip") is None:
        status["gossip"] = "off (this daemon does not cluster)"
    _print_fields(status)
    return 0


def _daemon_version(version: object) -> str:
    """The daemon's version, said beside this CLI's where they differ (a
    daemon runs on after an upgrade until it is restarted)."""
    if version == __version__:
        return str(version)
    shown = "unknown (a daemon from before status said it)" if version is None else str(version)
    return f"{shown}; this CLI is axnet {__version__}: restart the daemon to run the same"


def _print_fields(fields: Mapping[str, Any], indent: str = "") -> None:
    """``key: value`` lines, nested mappings indented under their key."""
    for key in sorted(fields):
        value = fields[key]
        if isinstance(value, Mapping):
            print(f"{indent}{key}:")
            _print_fields(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")


def cmd_run(args: argparse.Namespace) -> int:
    from ._supervisor import EngineFailed, RunOptions, run
    from .intercept._launcher import LaunchError

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(
            "axnet run: name the program to run after '--', e.g. "
            "axnet run --ip 10.77.0.5 -- python3 -m http.server 80",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if len(args.label) > MAX_LABELS:
        print(f"axnet run: at most {MAX_LABELS} --label, got {len(args.label)}", file=sys.stderr)
        return EXIT_USAGE
    labels: Labels = labels_from(args.label)
    options = RunOptions(
        argv=tuple(argv),
        vip=args.ip,
        name=args.name,
        labels=labels,
        runtime_dir=runtime_dir(args.runtime_dir),
        busy_poll_us=args.busy_poll,
    )
    try:
        status = run(options)
    except LaunchError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except EngineFailed as exc:
        print(f"axnet run: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, BaseExceptionGroup) as exc:
        # The supervisor failed (the app's tree is gone by now): say why.
        if first_of(exc, (KeyboardInterrupt,)) is not None:
            raise
        control = first_of(exc, (ControlError,))
        if control is not None:
            print(f"axnet run: {control}", file=sys.stderr)
            return EXIT_FAILURE
        found = first_of(exc, (OSError,))
        if found is None:
            raise
        hint = ""
        if isinstance(found, OSError) and found.errno in (errno.EMFILE, errno.ENFILE):
            hint = "; raise the open-file limit (ulimit -n) and run it again"
        elif isinstance(found, OSError) and found.errno == errno.EAGAIN:
            hint = "; the user's limit on processes (ulimit -u) may be reached"
        print(f"axnet run: the supervisor failed: {found}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    return status if status >= 0 else _end_by_signal(-status)


def _end_by_signal(signum: int) -> int:
    """End as the app ended, by its signal (or as the demo was stopped).

    A shell tells a child that Ctrl-C ended from one that exited 130: bash
    stops a loop of ``axnet run`` commands only for the first.  No core file
    of ours for the app's SIGSEGV or SIGQUIT.  A signal that does not end a
    process by default cannot have ended the app: 128 + its number then.
    """
    import resource
    import signal

    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    with contextlib.suppress(ValueError, OSError):  # SIGKILL's cannot be set, nor need be
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    # The supervisor blocks the signals it forwards, in every thread.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    return 128 + signum


def cmd_daemon(args: argparse.Namespace) -> int:
    from ._daemonmain import run_daemon

    return run_daemon(args)


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        client = _client(args)
    except DaemonUnavailable as exc:
        if not exc.nobody_listens:
            raise
        # The state asked for is there already: not a failure.
        path = control_path(runtime_dir(args.runtime_dir))
        print(f"axnet stop: no daemon runs at {path}: nothing to stop", file=sys.stderr)
        return 0
    with client:
        try:
            apps = client.request("apps")["apps"]
        except ControlError:
            apps = []  # the stop matters, not the count
        client.request("stop")
    mine = [a for a in apps if a.get("pid") is not None]  # this node's
    if mine:
        print(
            f"axnet stop: stopped; {len(mine)} app(s) under axnet run keep running and "
            "re-attach to the next daemon (axnet daemon)",
            file=sys.stderr,
        )
    return 0


#: Seconds `axnet join` waits for the daemon: above the slowest profile's
#: stream timeout (wan: 30 s), with room for resolving the seeds.
JOIN_TIMEOUT_S = 60.0


def cmd_join(args: argparse.Namespace) -> int:
    from ._gossip_address import parse_address

    for seed in args.seeds:
        try:
            parse_address(seed, flag="SEED")
        except ValueError as exc:
            print(f"axnet join: {exc}", file=sys.stderr)
            return EXIT_USAGE
    path = control_path(runtime_dir(args.runtime_dir))
    with ControlClient(path, timeout=JOIN_TIMEOUT_S) as client:
        reply = client.request("join", seeds=list(args.seeds))
    joined, asked = int(reply["joined"]), len(args.seeds)
    conflicts = reply.get("conflicts") or []
    if conflicts:
        print(
            f"axnet join: another member uses this node's name (at {', '.join(conflicts)}); "
            "members need distinct names: restart one daemon with its own --name",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    unresolved = reply.get("unresolved") or {}
    for seed, reason in unresolved.items():
        print(
            f"axnet join: cannot resolve seed {seed!r} ({reason}); give its IP address, "
            "or a name this host resolves",
            file=sys.stderr,
        )
    itself = reply.get("itself") or []
    for seed in itself:
        print(
            f"axnet join: seed {seed!r} is this node itself; give the address of another "
            "member (its --advertise address and gossip port)",
            file=sys.stderr,
        )
    if not joined and len(unresolved) + len(itself) >= asked:
        return EXIT_FAILURE
    if not joined:
        print(
            f"axnet join: no member answered through {asked - len(unresolved) - len(itself)} "
            "seed(s). "
            "Check the seed's "
            "address and gossip port (default 7946), that its daemon gossips "
            "('axnet daemon --advertise IP'), and that both use the same --gossip-key-file; "
            "the daemon's log (axnet daemon -v) says what failed.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(f"joined through {joined} of {asked} seed(s)")
    return 0


def cmd_leave(args: argparse.Namespace) -> int:
    with _client(args) as client:
        # A daemon before f1bff20 answered a leave OK without gossip, and
        # this said it had left a cluster it was never in: ask first.
        if client.request("status").get("gossip") is None:
            raise ControlError(NO_GOSSIP, err=errno.ENOTCONN)
        client.request("leave")
    # The daemon runs on, out of the cluster: say what that means.
    print(
        "left the cluster: the other members withdraw this node's services, and "
        "this node no longer hears of theirs (its table keeps what it knew); "
        "'axnet join SEED' rejoins, 'axnet stop' stops the daemon"
    )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    import base64

    print(base64.b64encode(os.urandom(32)).decode())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    status = run_demo(verbose=args.verbose, as_json=args.json)
    return status if status >= 0 else _end_by_signal(-status)


_COMMANDS = {
    "daemon": cmd_daemon,
    "run": cmd_run,
    "services": cmd_listing,
    "apps": cmd_listing,
    "members": cmd_listing,
    "status": cmd_listing,
    "stop": cmd_stop,
    "join": cmd_join,
    "leave": cmd_leave,
    "keygen": cmd_keygen,
    "demo": cmd_demo,
}


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            found: argparse.ArgumentParser = action.choices[command]
            return found
    return parser


def _takes(parser: argparse.ArgumentParser, word: str) -> bool:
    """Whether *word* is an option of *parser* (``-vv`` as ``-v``, ``--x=1`` as ``--x``)."""
    flag = word.split("=", 1)[0] if word.startswith("--") else word[:2]
    return flag in parser._option_string_actions  # argparse keeps its options only here


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    words = list(sys.argv[1:] if argv is None else argv)
    if extra and args.command in words:
        # `axnet -v status`: the command's own option, given before it.
        early = [word for word in extra if word in words[: words.index(args.command)]]
        if early and all(_takes(_subparser(parser, args.command), word) for word in early):
            parser.error(
                f"{' '.join(early)}: options go after the command "
                f"(axnet {args.command} {' '.join(early)} …)"
            )
    if extra:
        # Reported by the command's own parser, with its usage, not the top level's.
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.verbose)
    for stream in (sys.stdout, sys.stderr):
        # Under LC_ALL=C, say: what the encoding cannot hold (a name in
        # another script) is written as an escape, not a traceback.
        if stream is not None and isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        status = _COMMANDS[args.command](args)
        if sys.stdout is not None:  # None: started with it closed (`>&-`)
            sys.stdout.flush()  # here, so that a closed pipe is met below, not at exit
        return status
    except ControlError as exc:
        print(f"axnet {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        # Ctrl-C that reached a trio nursery comes out wrapped.
        if group.split(KeyboardInterrupt)[1] is None:
            return EXIT_INTERRUPTED
        raise
    except BrokenPipeError:
        # The reader went away (`axnet apps | head -1`): stop quietly, as
        # tools killed by SIGPIPE do, and keep the final flush from failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRORS or sys.stdout is None:
            raise
        # The output could not be written (a full disk, /dev/full): say so,
        # and keep the final flush from failing again with a traceback.
        with contextlib.suppress(OSError):  # a hung-up terminal takes stderr too
            print(f"axnet {args.command}: cannot write its output: {exc.strerror}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Path", "build_parser", "main"]
