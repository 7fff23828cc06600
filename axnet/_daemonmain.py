"""``axnet daemon``: flags → configuration → the trio program."""

from __future__ import annotations

import argparse
import sys

import trio

from ._control import ControlError, runtime_dir
from ._daemon import Daemon, DaemonConfig, default_node_name
from ._node import NodeConfig, PortRange
from ._table import ip_address


def node_config(args: argparse.Namespace) -> NodeConfig:
    """Validate the daemon's flags; raises ValueError with the message for the user."""
    address = args.address
    if address is None and args.advertise:
        host = (
            args.advertise.rsplit(":", 1)[0] if args.advertise.count(":") == 1 else args.advertise
        )
        try:
            address = ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(
                f"--advertise must be HOST[:PORT] with an IP host, got {args.advertise!r}"
            ) from None
    if address is None:
        address = ip_address("127.0.0.1")
    listen = PortRange.parse(args.listen_ports, flag="--listen-ports")
    client = PortRange.parse(args.client_ports, flag="--client-ports")
    if not (listen.hi < client.lo or client.hi < listen.lo):
        raise ValueError("--listen-ports and --client-ports must not overlap")
    if not 16 <= args.client_block <= len(client):
        raise ValueError(
            f"--client-block must be between 16 and {len(client)}, got {args.client_block}"
        )
    return NodeConfig(
        name=args.name or default_node_name(),
        real_host=address,
        listen_ports=listen,
        client_ports=client,
        client_block=args.client_block,
        virtual_range=args.virtual_range,
    )


def run_daemon(args: argparse.Namespace) -> int:
    try:
        node = node_config(args)
    except ValueError as exc:
        print(f"axnet daemon: {exc}", file=sys.stderr)
        return 2
    daemon = Daemon(DaemonConfig(node=node, runtime_dir=runtime_dir(args.runtime_dir)))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if args.bind or args.advertise or args.join or args.gossip_key_file:
                from ._gossip import start_cluster

                await start_cluster(nursery, daemon, args)
            await daemon.run()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except ControlError as exc:
        print(f"axnet daemon: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
