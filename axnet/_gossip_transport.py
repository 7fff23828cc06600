"""The gossip transport: one UDP socket, one TCP listener, and the streams on them.

Theory of operation
-------------------
The transport carries bytes between peers and a :class:`Receiver` (the
cluster, which drives the core, see :mod:`axnet._gossip`); what they mean is
none of its business.

* One UDP socket and one TCP listener on the same ``--bind`` port (7946 by
  default, as Serf).  A TCP connection carries exactly one exchange, a
  4-byte big-endian length then the payload, each way (push-pull, join, TCP
  fallback ping).
* Peers are not trusted.  Datagrams above ``swim.MAX_PACKET_BYTES`` (the core
  never builds one) and streams announcing more than
  ``swim.MAX_PUSH_PULL_BYTES`` are dropped unread; every stream, both ways,
  lives at most ``Config.tcp_timeout`` seconds, so a peer that stalls in the
  middle of a push-pull costs a task for that long and no more; at most
  ``MAX_INBOUND_STREAMS`` inbound (``MAX_INBOUND_PER_SOURCE`` from one
  address, and ``MEMBER_RESERVED_STREAMS`` kept for members' addresses) and
  ``MAX_OUTBOUND_STREAMS`` outbound streams exist at once (the rest are
  refused and counted).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections import Counter
from typing import Protocol

import attrs
import trio

import swim

from ._gossip_address import host_port, ip_literal

log = logging.getLogger("axnet.gossip")

#: Inbound streams served at once; more are closed at once and counted.
MAX_INBOUND_STREAMS = 8
#: Inbound streams from one address at once: a host that opens streams and
#: never sends holds this many slots (each for tcp_timeout), not all of them.
MAX_INBOUND_PER_SOURCE = 2
#: Inbound slots only members' addresses may take: hosts that are no member
#: (a joining node, or anybody who can reach the port) share the rest.
MEMBER_RESERVED_STREAMS = 2
#: Outbound streams (push-pull, join, TCP ping) at once; more fail at once.
MAX_OUTBOUND_STREAMS = 16
#: Receive buffer: the largest UDP payload, so an oversized datagram is seen whole.
RECEIVE_BUFFER_BYTES = 65536

_FRAME = struct.Struct("!I")


class GossipError(Exception):
    """The gossip sockets cannot be bound (the address is in use or not ours)."""


class Receiver(Protocol):
    """What the transport hands what it receives to."""

    def datagram_received(self, src: swim.Address, data: bytes) -> None:
        """A datagram of at most ``swim.MAX_PACKET_BYTES`` came from *src*."""

    def stream_received(self, src: swim.Address, data: bytes) -> bytes:
        """*src* opened a stream and sent *data*; the reply (none if empty)."""

    def is_member_host(self, host: str) -> bool:
        """Whether a member gossips from *host*: it may take the reserved slots."""


# -- stream framing ----------------------------------------------------------------


class _StreamError(Exception):
    """A stream ended early or announced too much."""


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(min(size - len(data), RECEIVE_BUFFER_BYTES))
        if not chunk:
            raise _StreamError("peer closed the stream early")
        data += chunk
    return bytes(data)


class _Oversized(_StreamError):
    pass


async def _receive_frame(stream: trio.SocketStream) -> bytes:
    (length,) = _FRAME.unpack(await _receive_exactly(stream, _FRAME.size))
    if length > swim.MAX_PUSH_PULL_BYTES:
        raise _Oversized(f"stream announces {length} bytes (limit {swim.MAX_PUSH_PULL_BYTES})")
    return await _receive_exactly(stream, length)


def _frame(data: bytes) -> bytes:
    return _FRAME.pack(len(data)) + data


# -- the transport -------------------------------------------------------------------


@attrs.define
class TransportStats:
    """What the transport counts: input it refused, and what it failed to carry."""

    datagrams_oversized: int = 0
    datagrams_send_errors: int = 0
    datagrams_receive_errors: int = 0
    streams_busy: int = 0
    streams_timed_out: int = 0
    streams_oversized: int = 0
    streams_io_errors: int = 0


class GossipTransport:
    """The sockets of one gossip member on *bind*, serving a :class:`Receiver`."""

    def __init__(self, receiver: Receiver, *, bind: swim.Address, tcp_timeout: float) -> None:
        self._receiver = receiver
        self._bind = bind
        self._family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        self._tcp_timeout = tcp_timeout
        self._udp: trio.socket.SocketType | None = None
        self._tcp: trio.socket.SocketType | None = None
        self._inbound = 0
        self._inbound_from: Counter[str] = Counter()
        self._outbound = 0
        self.stats = TransportStats()

    async def bind(self) -> int:
        """Open the UDP socket and the TCP listener; the port bound.

        GossipError if we cannot.  A bind port of 0 picks a port free for
        both (tests).
        """
        host, port = self._bind
        last: OSError | None = None
        for _ in range(20 if port == 0 else 1):
            udp = trio.socket.socket(self._family, socket.SOCK_DGRAM)
            tcp = trio.socket.socket(self._family, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await udp.bind((host, port))
                chosen: int = udp.getsockname()[1]
                await tcp.bind((host, chosen))
                tcp.listen(128)
            except OSError as exc:
                udp.close()
                tcp.close()
                last = exc
                continue
            self._udp, self._tcp = udp, tcp
            return chosen
        assert last is not None
        hint = ""
        if last.errno == errno.EADDRINUSE:
            hint = (
                " (another daemon of this host gossips there? give each its own "
                "--bind HOST:PORT, e.g. --bind 127.0.0.2:7946 beside --address 127.0.0.2)"
            )
        raise GossipError(
            f"cannot listen for gossip on {host_port(self._bind)}: {last.strerror or last}{hint}"
        )

    async def serve(self) -> None:
        """Receive datagrams and serve streams until cancelled; ``bind`` first."""
        assert self._udp is not None and self._tcp is not None, "bind() first"
        listener = trio.SocketListener(self._tcp)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_datagrams)
            nursery.start_soon(trio.serve_listeners, self._serve_stream, [listener])

    async def resolve(self, host: str, port: int) -> swim.Address:
        """(host, port) with *host* looked up, in the bind address's family, if a name."""
        if ip_literal(host):
            return (host, port)
        infos = await trio.socket.getaddrinfo(host, port, self._family, socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"no address for {host}")
        return (str(infos[0][4][0]), port)

    # -- datagrams -----------------------------------------------------------------------

    async def send(self, datagram: swim.Datagram) -> None:
        """Send *datagram*; a failure is counted, not raised."""
        assert self._udp is not None
        if not ip_literal(datagram.dest[0]):
            self.stats.datagrams_send_errors += 1
            return  # an address a peer made up: no DNS lookup on the gossip path
        try:
            await self._udp.sendto(datagram.data, datagram.dest)
        except (OSError, ValueError) as exc:  # ValueError: an address trio cannot encode
            self.stats.datagrams_send_errors += 1
            log.debug("gossip send failed to=%s reason=%s", host_port(datagram.dest), exc)

    async def _receive_datagrams(self) -> None:
        assert self._udp is not None
        while True:
            try:
                data, source = await self._udp.recvfrom(RECEIVE_BUFFER_BYTES)
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                self.stats.datagrams_receive_errors += 1
                log.debug("gossip receive failed reason=%s", exc)
                continue
            src: swim.Address = (str(source[0]), int(source[1]))
            if len(data) > swim.MAX_PACKET_BYTES:
                self.stats.datagrams_oversized += 1
                continue
            self._receiver.datagram_received(src, data)

    # -- streams -------------------------------------------------------------------------

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                peer = stream.socket.getpeername()
            except OSError:  # reset before we got to it
                self.stats.streams_io_errors += 1
                return
            src: swim.Address = (str(peer[0]), int(peer[1]))
            limit = MAX_INBOUND_STREAMS
            if not self._receiver.is_member_host(src[0]):
                limit -= MEMBER_RESERVED_STREAMS
            if self._inbound >= limit or self._inbound_from[src[0]] >= MAX_INBOUND_PER_SOURCE:
                self.stats.streams_busy += 1
                return
            self._inbound += 1
            self._inbound_from[src[0]] += 1
            try:
                with trio.move_on_after(self._tcp_timeout) as scope:
                    data = await _receive_frame(stream)
                    reply = self._receiver.stream_received(src, data)
                    if reply:
                        await stream.send_all(_frame(reply))
                if scope.cancelled_caught:
                    self.stats.streams_timed_out += 1
                    log.debug("gossip stream timed out from=%s", host_port(src))
            except _Oversized:
                self.stats.streams_oversized += 1
            except (_StreamError, trio.BrokenResourceError, OSError):
                self.stats.streams_io_errors += 1
            finally:
                self._inbound -= 1
                self._inbound_from[src[0]] -= 1
                if not self._inbound_from[src[0]]:
                    del self._inbound_from[src[0]]

    async def exchange(self, request: swim.StreamRequest) -> bytes | None:
        """Open the stream *request* asks for and send its data; the peer's reply.

        None if the stream failed, or was refused at once: too many streams
        open, or a destination that is no IP address (seeds were resolved
        before the core saw them).
        """
        if self._outbound >= MAX_OUTBOUND_STREAMS:
            self.stats.streams_busy += 1
            return None
        if not ip_literal(request.dest[0]):
            return None
        self._outbound += 1
        reply: bytes | None = None
        try:
            with trio.move_on_after(self._tcp_timeout) as scope:
                host, port = request.dest
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(_frame(request.data))
                    reply = await _receive_frame(stream)
            if scope.cancelled_caught:
                self.stats.streams_timed_out += 1
        except _Oversized:
            self.stats.streams_oversized += 1
        except (_StreamError, trio.BrokenResourceError, OSError, ValueError) as exc:
            log.debug(
                "gossip stream failed to=%s purpose=%s reason=%s",
                host_port(request.dest),
                request.purpose.value,
                exc,
            )
        finally:
            self._outbound -= 1
        return reply


__all__ = [
    "MAX_INBOUND_PER_SOURCE",
    "MAX_INBOUND_STREAMS",
    "MAX_OUTBOUND_STREAMS",
    "MEMBER_RESERVED_STREAMS",
    "GossipError",
    "GossipTransport",
    "Receiver",
    "TransportStats",
]
