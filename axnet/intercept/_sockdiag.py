"""Which sockets still exist: NETLINK_SOCK_DIAG for listeners, /proc for the rest.

The engine must notice when the app closes a virtual listener, to withdraw its
service record, but ``close`` is not trapped (it is far too hot to trap).
Once a second it asks the kernel for the inodes of the listening TCP sockets
of this network namespace whose port is within those the app bound: one
netlink dump filtered in the kernel, by state (thousands of connections in
TIME_WAIT cost nothing, unlike reading ``/proc/net/tcp``) and by port (a
neighbour's thousands of listeners cost nothing either: unfiltered, 19 000 of
them took the engine up to 131 ms a sweep, with every trapped call waiting).
A socket that is only bound appears in no table; for those the fd table of
the thread that bound it is the witness, and when that thread is gone, those
of every process of the app (its threads and children may hold the socket
still).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes).
_REQ = struct.Struct("=BBBxI48x")
# The request's filter (linux/inet_diag.h): an attribute holding a program
# of inet_diag_bc_op {code, yes, no}; a port comparison's port sits in the
# `no` of the op after it.  Each op jumps ahead by `yes` bytes when its test
# holds and by `no` when not; the socket is taken when the program ends
# exactly at its last byte, and not when a jump leaves it.
_NLATTR = struct.Struct("=HH")
_BC_OP = struct.Struct("=BBH")
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3
# inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue, wqueue, uid, inode.
_MSG_INODE_OFFSET = 4 + 48 + 16
#: Upper bound on one dump's reply, in bytes, so a huge table cannot exhaust memory.
MAX_DUMP_BYTES = 64 * 1024 * 1024


def port_filter(lo: int, hi: int) -> bytes:
    """The request attribute that keeps sockets whose local port is in lo..hi."""
    if not 0 <= lo <= hi <= 65535:
        raise ValueError(f"bad port range {lo}-{hi}")
    reject = 2 * 2 * _BC_OP.size + 4  # past the end, from the first op
    program = (
        _BC_OP.pack(INET_DIAG_BC_S_GE, 2 * _BC_OP.size, reject)
        + _BC_OP.pack(0, 0, lo)
        + _BC_OP.pack(INET_DIAG_BC_S_LE, 2 * _BC_OP.size, reject - 2 * _BC_OP.size)
        + _BC_OP.pack(0, 0, hi)
    )
    return _NLATTR.pack(_NLATTR.size + len(program), INET_DIAG_REQ_BYTECODE) + program


def _dump(family: int, states: int, ports: tuple[int, int] | None) -> set[int]:
    inodes: set[int] = set()
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    ) as nl:
        body = _REQ.pack(family, socket.IPPROTO_TCP, 0, states)
        if ports is not None:
            body += port_filter(*ports)
        nl.send(
            _NLMSGHDR.pack(
                _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
            )
            + body
        )
        received = 0
        while True:
            data = nl.recv(65536)
            received += len(data)
            if not data or received > MAX_DUMP_BYTES:
                return inodes
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return inodes
                if kind == NLMSG_DONE:
                    return inodes
                if kind == NLMSG_ERROR:
                    raise OSError(errno.EIO, "sock_diag dump failed")
                payload = offset + _NLMSGHDR.size
                if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _MSG_INODE_OFFSET + 4:
                    inodes.add(struct.unpack_from("=I", data, payload + _MSG_INODE_OFFSET)[0])
                offset += (length + 3) & ~3


def listening_inodes(ports: tuple[int, int] | None = None) -> set[int]:
    """Inodes of the listening TCP sockets (IPv4 and IPv6) in this namespace:
    every one, or those whose local port is within *ports* (lo, hi)."""
    listening = 1 << TCP_LISTEN
    try:
        return _dump(socket.AF_INET, listening, ports) | _dump(socket.AF_INET6, listening, ports)
    except OSError:
        if ports is None:
            raise
    # A kernel that refuses the filter (none seen): every listener, as before it.
    return _dump(socket.AF_INET, listening, None) | _dump(socket.AF_INET6, listening, None)


def connection_inodes(port: int) -> set[int]:
    """Inodes of the TCP connections (IPv4 and IPv6) in this namespace whose
    local port is *port*, in any state but listening: those a closed
    listener there accepted (TIME_WAIT holds none: no inode, not counted)."""
    states = ((1 << 12) - 1) & ~(1 << TCP_LISTEN)
    found = _dump(socket.AF_INET, states, (port, port)) | _dump(
        socket.AF_INET6, states, (port, port)
    )
    found.discard(0)
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process *pid* has open (none if it is gone)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    inodes = set()
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def descendants(pid: int) -> list[int]:
    """Every process below *pid*: children, theirs, and so on."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(child) for child in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found
