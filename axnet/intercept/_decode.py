"""Socket address codec: the bytes an application passes to connect/bind.

Theory of operation
-------------------
The supervisor reads `addrlen` bytes from the application's memory and must
reach the same verdict the kernel would on those bytes, so decoding follows
the kernel, not libc:

* `addrlen` above sizeof(struct sockaddr_storage) (128) is EINVAL
  (net/socket.c, move_addr_to_kernel), as is one too short to hold the family.
* AF_INET needs 16 bytes (tcp_v4_connect, inet_bind); AF_INET6 needs 24
  (SIN6_LEN_RFC2133: scope_id is optional and then 0).  Extra bytes are
  ignored, as the kernel ignores them.
* `sin_port`, `sin6_flowinfo` and the address are in network order; the
  family and `sin6_scope_id` are in host order (x86_64: little-endian).
* AF_UNIX pathname addresses end at the first NUL (unix_mkname_bsd); abstract
  ones start with NUL and every byte up to addrlen counts.
* Any other family is handed over raw: what to do with AF_UNSPEC (connect's
  "disconnect") or AF_NETLINK is the caller's decision, not the codec's.

Malformed input is the application's error, reported as `SockaddrError(errno)`
carrying the errno the kernel would have returned.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from typing import assert_never

import attrs

AF_UNSPEC = 0
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10

#: sizeof(struct sockaddr_storage): a longer addrlen is EINVAL in the kernel.
MAX_SOCKADDR_LEN = 128
SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28
SIN6_LEN_RFC2133 = 24  # sockaddr_in6 without sin6_scope_id
#: sizeof(struct sockaddr_un).sun_path
UNIX_PATH_MAX = 108

_FAMILY = struct.Struct("=H")
_PORT = struct.Struct("!H")
_IN6_BODY = struct.Struct("!HI16s")  # port, flowinfo, addr (all network order)
_SCOPE = struct.Struct("=I")

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def _port(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"port must be 0..65535, got {value}")


def _u32(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{attr.name} must be 0..2**32-1, got {value}")


def _family(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"family must be 0..65535, got {value}")
    if value in (AF_UNIX, AF_INET, AF_INET6):
        raise ValueError(f"family {value} has its own class; OtherFamily is for the rest")


class SockaddrError(Exception):
    """The application passed an address the kernel would refuse with `errno`."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or errno.errorcode.get(err, str(err)))
        self.errno = err


@attrs.frozen
class Inet4:
    host: ipaddress.IPv4Address
    port: int = attrs.field(validator=_port)


@attrs.frozen
class Inet6:
    host: ipaddress.IPv6Address
    port: int = attrs.field(validator=_port)
    flowinfo: int = attrs.field(default=0, validator=_u32)
    scope_id: int = attrs.field(default=0, validator=_u32)


@attrs.frozen
class Unix:
    """AF_UNIX address; `path` starting with NUL is an abstract name, b"" unnamed."""

    path: bytes

    @property
    def abstract(self) -> bool:
        return self.path[:1] == b"\x00"


@attrs.frozen
class OtherFamily:
    """Any other family; `raw` is everything after the 2-byte family field."""

    family: int = attrs.field(validator=_family)
    raw: bytes


SockAddr = Inet4 | Inet6 | Unix | OtherFamily


def decode_sockaddr(data: bytes) -> SockAddr:
    """Decode `addrlen` bytes read from the application (see module docstring)."""
    n = len(data)
    if n > MAX_SOCKADDR_LEN:
        raise SockaddrError(errno.EINVAL, f"addrlen {n} > {MAX_SOCKADDR_LEN}")
    if n < _FAMILY.size:
        raise SockaddrError(errno.EINVAL, f"addrlen {n} cannot hold a family")
    (family,) = _FAMILY.unpack_from(data)
    if family == AF_INET:
        if n < SOCKADDR_IN_LEN:
            raise SockaddrError(errno.EINVAL, f"AF_INET addrlen {n} < {SOCKADDR_IN_LEN}")
        (port,) = _PORT.unpack_from(data, 2)
        return Inet4(ipaddress.IPv4Address(data[4:8]), port)
    if family == AF_INET6:
        if n < SIN6_LEN_RFC2133:
            raise SockaddrError(errno.EINVAL, f"AF_INET6 addrlen {n} < {SIN6_LEN_RFC2133}")
        port, flowinfo, addr = _IN6_BODY.unpack_from(data, 2)
        scope_id = _SCOPE.unpack_from(data, 24)[0] if n >= SOCKADDR_IN6_LEN else 0
        return Inet6(ipaddress.IPv6Address(addr), port, flowinfo, scope_id)
    if family == AF_UNIX:
        path = bytes(data[2:])
        if len(path) > UNIX_PATH_MAX:
            raise SockaddrError(errno.EINVAL, f"AF_UNIX path of {len(path)} bytes")
        if path[:1] != b"\x00":
            path = path.split(b"\x00", 1)[0]
        return Unix(path)
    return OtherFamily(family, bytes(data[2:]))


def encode_sockaddr(addr: SockAddr) -> bytes:
    """The bytes the kernel would write for `addr` (getsockname/accept)."""
    match addr:
        case Inet4(host=host, port=port):
            return _FAMILY.pack(AF_INET) + _PORT.pack(port) + host.packed + bytes(8)
        case Inet6(host=host, port=port, flowinfo=flowinfo, scope_id=scope_id):
            return (
                _FAMILY.pack(AF_INET6)
                + _IN6_BODY.pack(port, flowinfo, host.packed)
                + _SCOPE.pack(scope_id)
            )
        case Unix(path=path):
            if len(path) > UNIX_PATH_MAX:
                raise ValueError(f"AF_UNIX path is at most {UNIX_PATH_MAX} bytes, got {len(path)}")
            if path and not addr.abstract:
                if b"\x00" in path:
                    raise ValueError(f"AF_UNIX pathname contains NUL: {path!r}")
                if len(path) < UNIX_PATH_MAX:
                    # The kernel reports pathname sockets with their terminating NUL.
                    return _FAMILY.pack(AF_UNIX) + path + b"\x00"
            return _FAMILY.pack(AF_UNIX) + path
        case OtherFamily(family=family, raw=raw):
            return _FAMILY.pack(family) + raw
        case _:
            assert_never(addr)


def v4_mapped(addr: Inet4) -> Inet6:
    """`::ffff:a.b.c.d` for an AF_INET6 socket connecting to an IPv4 address."""
    return Inet6(ipaddress.IPv6Address(_V4_MAPPED_PREFIX + addr.host.packed), addr.port)


def unmap(addr: Inet6) -> Inet4 | Inet6:
    """The IPv4 address inside a v4-mapped IPv6 address, else `addr` itself."""
    mapped = addr.host.ipv4_mapped
    if mapped is None:
        return addr
    return Inet4(mapped, addr.port)


# -- fast paths for the engine ------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def inet_endpoint(data: bytes) -> tuple[IPAddress, int] | None:
    """``(ip, port)`` of an AF_INET or AF_INET6 sockaddr, v4-mapped addresses unmapped.

    None for any other family.  Raises :class:`SockaddrError` where
    :func:`decode_sockaddr` would.  The engine's hot path: no intermediate objects.
    """
    n = len(data)
    if n < _FAMILY.size or n > MAX_SOCKADDR_LEN:
        raise SockaddrError(errno.EINVAL, f"addrlen {n} out of range")
    family = data[0] | data[1] << 8
    if family == AF_INET:
        if n < SOCKADDR_IN_LEN:
            raise SockaddrError(errno.EINVAL, f"AF_INET addrlen {n} < {SOCKADDR_IN_LEN}")
        return ipaddress.IPv4Address(data[4:8]), data[2] << 8 | data[3]
    if family == AF_INET6:
        if n < SIN6_LEN_RFC2133:
            raise SockaddrError(errno.EINVAL, f"AF_INET6 addrlen {n} < {SIN6_LEN_RFC2133}")
        port = data[2] << 8 | data[3]
        if data[8:20] == _V4_MAPPED_PREFIX:
            return ipaddress.IPv4Address(data[20:24]), port
        return ipaddress.IPv6Address(data[8:24]), port
    return None


_IN4_FAMILY = _FAMILY.pack(AF_INET)
_IN6_FAMILY = _FAMILY.pack(AF_INET6)


def unspec_wildcard_as_inet(data: bytes) -> bytes | None:
    """The AF_INET sockaddr that a bind on an AF_INET socket reads *data* as,
    when *data* is AF_UNSPEC with address 0.0.0.0 (Linux's compatibility rule
    in ``__inet_bind``: a ``struct sockaddr_in`` whose family was left zero);
    None for anything else."""
    if len(data) < SOCKADDR_IN_LEN or data[0] | data[1] << 8 != AF_UNSPEC:
        return None
    if data[4:8] != bytes(4):
        return None
    return _IN4_FAMILY + data[2:]


def pack_inet(family: int, ip: IPAddress, port: int) -> bytes:
    """The sockaddr an AF_INET or AF_INET6 socket reports for ``ip:port``.

    An IPv4 address in an AF_INET6 socket is v4-mapped; an IPv6 address
    cannot be expressed in an AF_INET socket (ValueError).
    """
    if family == AF_INET6:
        body = _V4_MAPPED_PREFIX + ip.packed if ip.version == 4 else ip.packed
        return _IN6_FAMILY + _PORT.pack(port) + bytes(4) + body + bytes(4)
    if ip.version != 4:
        raise ValueError(f"{ip} cannot be expressed in an AF_INET sockaddr")
    return _IN4_FAMILY + _PORT.pack(port) + ip.packed + bytes(8)
