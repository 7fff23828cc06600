"""``axnet daemon``: flags → configuration → the trio program."""

from __future__ import annotations

import argparse
import socket
import sys
from typing import TYPE_CHECKING

import trio

from ._control import ControlError, runtime_dir
from ._daemon import Daemon, DaemonConfig, default_node_name
from ._fdlimit import raise_fd_limit
from ._groups import first_of
from ._heap import freeze_startup
from ._node import NodeConfig, PortRange
from ._table import IPAddress, ip_address, labels_from
from ._wire import has_control

if TYPE_CHECKING:
    from ._gossip_options import GossipOptions


def node_config(args: argparse.Namespace, *, gossip_host: str | None = None) -> NodeConfig:
    """Validate the daemon's flags; raises ValueError with the message for the user.

    The node's real address is ``--address``, else the ``--advertise`` host,
    else *gossip_host* (the address gossip advertises), else 127.0.0.1.
    """
    address = args.address
    if address is None and args.advertise:
        text = args.advertise.strip()
        if text.startswith("["):  # [V6] or [V6]:PORT
            host = text[1:].partition("]")[0]
        elif text.count(":") == 1:  # V4:PORT or NAME:PORT
            host = text.rsplit(":", 1)[0]
        else:  # V4, NAME or a bare V6
            host = text
        try:
            address = ip_address(host)
        except ValueError as exc:
            scoped = "scoped" in str(exc)  # fe80::1%eth0: an address, but not one to share
            raise ValueError(
                f"--advertise: {exc}"
                if scoped
                else f"--advertise must be HOST[:PORT] with an IP host, got {args.advertise!r}"
            ) from None
    if address is None and gossip_host is not None:
        address = ip_address(gossip_host)
    if address is None:
        address = ip_address("127.0.0.1")
    listen = PortRange.parse(args.listen_ports, flag="--listen-ports")
    if args.client_ports is not None:
        client = PortRange.parse(args.client_ports, flag="--client-ports")
    else:
        client = default_client_ports(listen, _ephemeral_range())
    if not (listen.hi < client.lo or client.hi < listen.lo):
        raise ValueError("--listen-ports and --client-ports must not overlap")
    if not 16 <= args.client_block <= len(client):
        raise ValueError(
            f"--client-block must be between 16 and {len(client)}, got {args.client_block}"
        )
    if args.name == "":
        raise ValueError("--name must not be empty (without it: the host name)")
    name = args.name or default_node_name()
    if len(name.encode()) > 255:  # gossip names travel as at most 255 bytes
        raise ValueError(f"--name must be at most 255 bytes of UTF-8, got {len(name.encode())}")
    if has_control(name):  # peers refuse them: names reach terminals and logs
        raise ValueError(f"--name may not contain control characters, got {name!r}")
    return NodeConfig(
        name=name,
        real_host=address,
        listen_ports=listen,
        client_ports=client,
        client_block=args.client_block,
        virtual_range=args.virtual_range,
    )


def run_daemon(args: argparse.Namespace) -> int:
    clustered = bool(args.bind or args.advertise or args.join or args.gossip_key_file)
    if not clustered:
        if args.label or args.profile is not None:
            print(
                "axnet daemon: --label and --profile are gossip settings, and this daemon "
                "does not gossip; add --advertise IP (or --bind, --join) to cluster",
                file=sys.stderr,
            )
            return 2
        return _run(args, None)
    # Imported here: a daemon without gossip never loads swim and cryptography.
    from ._gossip_options import gossip_options

    try:
        gossip = gossip_options(
            bind=args.bind,
            advertise=args.advertise,
            join=args.join,
            key_file=args.gossip_key_file,
            profile=args.profile or "lan",
            address=str(args.address) if args.address is not None else None,
            labels=labels_from(args.label),
        )
    except ValueError as exc:
        print(f"axnet daemon: {exc}", file=sys.stderr)
        return 2
    return _run(args, gossip)


def _run(args: argparse.Namespace, gossip: GossipOptions | None) -> int:
    try:
        node = node_config(args, gossip_host=gossip.advertise[0] if gossip else None)
    except ValueError as exc:
        print(f"axnet daemon: {exc}", file=sys.stderr)
        return 2
    problem = _unbindable(node.real_host)
    if problem is not None:
        print(
            f"axnet daemon: apps' listeners are bound to {node.real_host} and it cannot be "
            f"bound here ({problem}); give --address (or --advertise) an address of this host",
            file=sys.stderr,
        )
        return 2
    problem = port_problem(
        node.listen_ports, node.client_ports, _ephemeral_range(), _lowest_bindable_port()
    )
    if problem is not None:
        print(f"axnet daemon: {problem}", file=sys.stderr)
        return 2
    raise_fd_limit()  # a session per app: a thousand apps need more than 1024 fds
    daemon = Daemon(
        DaemonConfig(node=node, runtime_dir=runtime_dir(args.runtime_dir), announce=True)
    )
    reported: tuple[type[Exception], ...] = (ControlError, OSError)

    async def main() -> None:
        cluster = None
        if gossip is not None:
            from ._gossip import LEAVE_PROPAGATE_S, GossipCluster

            cluster = GossipCluster(daemon, gossip)
            # Outside the nursery, so that a bind error is not wrapped in a group.
            await cluster.bind()
        async with trio.open_nursery() as nursery:
            if cluster is not None:
                await nursery.start(cluster.run)
                daemon.cluster = cluster
            await daemon.run()
            if cluster is not None:
                with trio.move_on_after(LEAVE_PROPAGATE_S + 1):
                    await cluster.leave()
            nursery.cancel_scope.cancel()

    if gossip is not None:
        from ._gossip_transport import GossipError

        reported = (ControlError, GossipError, OSError)
    try:
        freeze_startup()
        trio.run(main)
    except BaseException as exc:
        # Errors from inside the nurseries arrive wrapped in exception groups.
        if first_of(exc, (KeyboardInterrupt,)) is not None:
            return 0
        found = first_of(exc, reported)
        if found is None:
            raise
        print(f"axnet daemon: {found}", file=sys.stderr)
        return 1
    return 0


def default_client_ports(listen: PortRange, ephemeral: PortRange | None) -> PortRange:
    """The kernel's ephemeral range, above the listener ports where they meet."""
    if ephemeral is None:
        return PortRange(lo=32768, hi=60999)  # Linux's default range
    lo = ephemeral.lo
    if ephemeral.lo <= listen.hi and listen.lo <= ephemeral.hi:  # they overlap
        lo = listen.hi + 1
    if lo > ephemeral.hi:
        raise ValueError(
            f"the kernel's ephemeral ports {ephemeral.lo}-{ephemeral.hi} leave none above "
            f"--listen-ports {listen.lo}-{listen.hi}: give --listen-ports below them, "
            "or --client-ports"
        )
    return PortRange(lo=lo, hi=ephemeral.hi)


def port_problem(
    listen: PortRange, client: PortRange, ephemeral: PortRange | None, lowest_bindable: int
) -> str | None:
    """Why the kernel would defeat these port ranges, or None.

    A client block works only inside the kernel's ephemeral range
    (IP_LOCAL_PORT_RANGE narrows it, never widens it): elsewhere connections
    leave from any port and servers see the node's address, not the app's.
    Listener ports below the unprivileged start cannot be bound at all.
    """
    if ephemeral is not None and not (ephemeral.lo <= client.lo and client.hi <= ephemeral.hi):
        return (
            f"--client-ports {client.lo}-{client.hi} must lie within the kernel's ephemeral "
            f"ports {ephemeral.lo}-{ephemeral.hi} (net.ipv4.ip_local_port_range), or servers "
            "see this node's address instead of apps' virtual IPs"
        )
    if listen.lo < lowest_bindable:
        return (
            f"--listen-ports {listen.lo}-{listen.hi} starts below {lowest_bindable}, the "
            "lowest port this user may bind (net.ipv4.ip_unprivileged_port_start); apps "
            f"still get port 80 and any other: pick ports from {lowest_bindable} up"
        )
    return None


def _ephemeral_range() -> PortRange | None:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return PortRange(lo=lo, hi=hi)
    except (OSError, ValueError):
        return None


_CAP_NET_BIND_SERVICE = 10


def _lowest_bindable_port() -> int:
    """1 with CAP_NET_BIND_SERVICE, else ip_unprivileged_port_start."""
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
        if int(caps.split()[1], 16) >> _CAP_NET_BIND_SERVICE & 1:
            return 1
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError, StopIteration):
        return 1  # cannot tell: let bind say


def _unbindable(address: IPAddress) -> str | None:
    """Why a TCP socket cannot bind *address* here (not this host's), or None."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
