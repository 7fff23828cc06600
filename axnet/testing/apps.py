"""Small socket programs that tests run under ``axnet run``.

They know nothing of axnet: each prints one JSON line with what the kernel
(or axnet, pretending to be it) told it.  Run as
``python -m axnet.testing.apps NAME ARGS…``; they live in the package so that
an unprivileged user can run them from the installed project.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)


def _out(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _addr(address: object) -> list[object]:
    return list(address) if isinstance(address, tuple) else [address]


def names(host: str, port: str, source: str = "") -> None:
    """Connect (from SOURCE, any port, when given); report
    getsockname/getpeername and what the server said."""
    _out(**_names(host, port, source))


def names_after(trigger: str, *targets: str) -> None:
    """Once file TRIGGER exists, ``names`` for each HOST,PORT[,SOURCE]: one
    app, one client port block, whose record the test lets spread first."""
    _wait_for_file(trigger, True)
    for target in targets:
        _out(**_names(*target.split(",")))


def _names(host: str, port: str, source: str = "") -> dict[str, object]:
    bind = (source, 0) if source else None
    with socket.create_connection((host, int(port)), timeout=10, source_address=bind) as conn:
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        return {
            "sockname": _addr(conn.getsockname()),
            "peername": _addr(conn.getpeername()),
            "server": json.loads(data) if data else None,
        }


def _wait_for_file(path: str, exists: bool) -> None:
    """Until *path* exists (or is gone); two minutes at most."""
    import time

    give_up = time.monotonic() + 120
    while os.path.exists(path) != exists and time.monotonic() < give_up:
        time.sleep(0.05)


def greeter(port: str, family: str = "inet", reuseport: str = "") -> None:
    """Listen on PORT of every address (with SO_REUSEPORT when REUSEPORT is
    given); tell each client what accept returned."""
    af = socket.AF_INET6 if family == "inet6" else socket.AF_INET
    listener = socket.socket(af, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("::" if af == socket.AF_INET6 else "0.0.0.0", int(port)))
    listener.listen(512)
    _out(ready=True, sockname=_addr(listener.getsockname()))
    while True:
        conn, peer = listener.accept()
        with conn:
            body = json.dumps(
                {
                    "accepted_from": _addr(peer),
                    "peername": _addr(conn.getpeername()),
                    "sockname": _addr(conn.getsockname()),
                }
            )
            try:
                conn.sendall(body.encode())
            except OSError:
                pass


def name_later(port: str, count: str, trigger: str = "") -> None:
    """Accept COUNT connections on PORT and keep them; then (once file
    TRIGGER exists, when given) print where accept said each came from, and
    what getpeername says now, and close them."""
    listener = _listener(socket.AF_INET, "0.0.0.0", int(port))
    _out(ready=True)
    held, accepted = [], []
    for _ in range(int(count)):
        conn, peer = listener.accept()
        held.append(conn)
        accepted.append(_addr(peer)[0])
    if trigger:
        _out(held=len(held))
        _wait_for_file(trigger, True)
    _out(accepted=accepted, peernames=[_addr(c.getpeername())[0] for c in held])
    for conn in held:
        conn.close()


def open_connections(host: str, port: str, count: str) -> None:
    """Open COUNT connections to HOST:PORT, and keep them until the server
    closes them; report the address getsockname gives each once all are open."""
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(int(count))]
    socknames = [_addr(conn.getsockname())[0] for conn in held]
    for conn in held:
        conn.recv(1)
    _out(opened=len(held), socknames=socknames)


def bound_connections(host: str, port: str, count: str, source: str) -> None:
    """Open COUNT connections to HOST:PORT, a greeter, each from a socket
    bound to SOURCE, any port, first (``curl --interface``); keep them all
    open; report whom the server saw each come from."""
    held = []
    for _ in range(int(count)):
        conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        conn.bind((source, 0))
        conn.connect((host, int(port)))
        held.append(conn)
    seen = []
    for conn in held:
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        seen.append(json.loads(data)["accepted_from"][0])
    _out(seen=seen)


def node_ports(node: str, *ports: str) -> None:
    """Bind a socket with SO_REUSEPORT to each PORT of the node's own
    address NODE and listen; report each errno (0: bound)."""
    errors = {port: _bind_errno(socket.AF_INET, node, int(port), reuseport=True) for port in ports}
    _out(errors=errors)


def reopen_connections(host: str, port: str, first: str, closed: str, then: str) -> None:
    """Open FIRST connections to HOST:PORT, a greeter, and keep them; close
    the CLOSED first of them (reset: no TIME_WAIT keeps their ports); open
    THEN more.  Report, for each connection in order, its local port, the
    address getsockname names it by, and the one the server's accept gave."""
    held: list[socket.socket] = []
    opened: list[list[object]] = []

    def connect() -> None:
        conn = socket.create_connection((host, int(port)), timeout=30)
        greeting = b""
        while chunk := conn.recv(4096):  # the greeter closes after its answer
            greeting += chunk
        name, local_port = conn.getsockname()[:2]
        opened.append([local_port, name, json.loads(greeting)["accepted_from"][0]])
        held.append(conn)

    for _ in range(int(first)):
        connect()
    for conn in held[: int(closed)]:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    for _ in range(int(then)):
        connect()
    _out(opened=opened)
    for conn in held:
        conn.close()


def connect_errno(host: str, port: str) -> None:
    """One connect; report its errno (0 on success)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _out(errno=sock.connect_ex((host, int(port))))
    sock.close()


def connect_elsewhere(served: str, stuck: str, elsewhere: str) -> None:
    """A connect to ELSEWHERE (HOST:PORT) from sockets connected to SERVED,
    one listening, and one still connecting (non-blocking) to STUCK, a
    ``stuck-server``: report each errno (the kernel's answer for the state
    comes before any look at the address)."""
    import errno as errnos

    def endpoint(text: str) -> tuple[str, int]:
        host, _, port = text.rpartition(":")
        return host, int(port)

    target = endpoint(elsewhere)
    results: dict[str, int] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as connected:
        connected.connect(endpoint(served))
        results["connected"] = connected.connect_ex(target)
    # CPython's connect with a timeout polls, never connecting again: to the
    # kernel the socket is still connecting, and a connect now completes it.
    with socket.create_connection(endpoint(served), timeout=10) as polled:
        results["connected_by_poll"] = polled.connect_ex(target)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("0.0.0.0", 0))
        listening.listen(1)
        results["listening"] = listening.connect_ex(target)
    _held_open = _fill_queue(*stuck.split(":"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as connecting:
        connecting.setblocking(False)
        started = connecting.connect_ex(endpoint(stuck))
        if started != errnos.EINPROGRESS:
            raise SystemExit(f"the connect to {stuck} did not stay in progress: {started}")
        results["connecting"] = connecting.connect_ex(target)
    _out(**results)


def threads(host: str, port: str, nthreads: str, per_thread: str) -> None:
    """NTHREADS threads each connecting PER_THREAD times; count successes."""
    ok = [0] * int(nthreads)
    failures: list[str] = []

    def work(i: int) -> None:
        for _ in range(int(per_thread)):
            try:
                with socket.create_connection((host, int(port)), timeout=30) as conn:
                    conn.recv(4096)
                ok[i] += 1
            except OSError as exc:
                failures.append(repr(exc))

    pool = [threading.Thread(target=work, args=(i,)) for i in range(int(nthreads))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    _out(ok=sum(ok), failures=failures[:5])


def thread_after_thread(host: str, port: str, count: str) -> None:
    """COUNT threads, one after another, each making one connection to
    HOST:PORT, a greeter; count successes."""
    ok = 0
    failures: list[str] = []

    def work() -> None:
        nonlocal ok
        try:
            with socket.create_connection((host, int(port)), timeout=30) as conn:
                conn.recv(4096)
            ok += 1
        except OSError as exc:
            failures.append(repr(exc))

    for _ in range(int(count)):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    _out(ok=ok, failures=failures[:5])


def spaced(host: str, port: str, count: str, pause: str) -> None:
    """COUNT connections to HOST:PORT, a greeter, one at a time, PAUSE seconds
    apart; each one made is told on stderr ("spaced: N made")."""
    import time

    for i in range(int(count)):
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.recv(4096)
        print(f"spaced: {i + 1} made", file=sys.stderr, flush=True)
        time.sleep(float(pause))
    _out(ok=int(count))


def asyncio_clients(host: str, port: str, count: str) -> None:
    """COUNT concurrent non-blocking connects with asyncio."""
    import asyncio

    async def one() -> str:
        reader, writer = await asyncio.open_connection(host, int(port))
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        return str(json.loads(data)["accepted_from"][0])

    async def main() -> list[str]:
        return await asyncio.gather(*(one() for _ in range(int(count))))

    seen = asyncio.run(main())
    _out(ok=len(seen), accepted_from=sorted(set(seen)))


def trio_clients(host: str, port: str, count: str) -> None:
    """COUNT concurrent non-blocking connects with trio."""
    import trio

    seen: list[str] = []

    async def one() -> None:
        stream = await trio.open_tcp_stream(host, int(port))
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
        await stream.aclose()
        seen.append(str(json.loads(data)["accepted_from"][0]))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(int(count)):
                nursery.start_soon(one)

    trio.run(main)
    _out(ok=len(seen), accepted_from=sorted(set(seen)))


def fork_connect(host: str, port: str) -> None:
    """A forked child connects and reports through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                data = conn.recv(4096)
                os.write(
                    w,
                    json.dumps(
                        {"child_sockname": _addr(conn.getsockname()), "server": json.loads(data)}
                    ).encode(),
                )
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.waitpid(pid, 0)
    print(data.decode(), flush=True)


def exec_names(host: str, port: str) -> None:
    """exec() another program that connects."""
    os.execv(sys.executable, [sys.executable, "-m", "axnet.testing.apps", "names", host, port])


def exec_rebind(port: str, again: str = "") -> None:
    """Listen on PORT (closed on exec) with a thread blocked in accept on it,
    exec this again, which binds PORT at once: report that bind's errno."""
    if again:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", int(port)))
            _out(rebind=0)
        except OSError as exc:
            _out(rebind=exc.errno)
        return
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(8)
    tids: list[int] = []
    started = threading.Event()

    def worker() -> None:
        tids.append(threading.get_native_id())
        started.set()
        _libc.accept(listener.fileno(), None, None)

    threading.Thread(target=worker, daemon=True).start()
    started.wait(30)
    _until_held(tids[0], _ACCEPTS)
    argv = [sys.executable, "-m", "axnet.testing.apps", "exec-rebind", port, "again"]
    os.execv(sys.executable, argv)


def io_uring() -> None:
    """io_uring_setup(1, params): report the errno."""
    params = ctypes.create_string_buffer(120)
    result = _libc.syscall(425, 1, params)
    _out(result=result, errno=ctypes.get_errno() if result < 0 else 0)


def fastopen(host: str, port: str) -> None:
    """TCP Fast Open sends to HOST:PORT and to loopback, then the usual
    fallback to connect(); a UDP send with the flag, then without."""
    target = (host, int(port))
    results: dict[str, object] = {}

    def errno_of(name: str, fn: Callable[[socket.socket], object]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            try:
                fn(sock)
                results[name] = 0
            except OSError as exc:
                results[name] = exc.errno

    errno_of("sendto", lambda s: s.sendto(b"hi", socket.MSG_FASTOPEN, target))
    errno_of("sendmsg", lambda s: s.sendmsg([b"hi"], [], socket.MSG_FASTOPEN, target))
    errno_of("sendto_loopback", lambda s: s.sendto(b"hi", socket.MSG_FASTOPEN, ("127.0.0.1", 9)))
    with socket.create_connection(target, timeout=10) as conn:  # what apps do on EOPNOTSUPP
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        results["fallback"] = json.loads(data)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            results["udp"] = udp.sendto(b"x", socket.MSG_FASTOPEN, ("127.0.0.1", 9))
        except OSError as exc:
            results["udp"] = exc.errno
        results["udp_plain"] = udp.sendto(b"x", ("127.0.0.1", 9))
    _out(**results)


def hostile() -> None:
    """Socket calls with hostile arguments; report each errno."""
    results: dict[str, int] = {}

    def call(name: str, fn: Callable[[], int]) -> None:
        ctypes.set_errno(0)
        rc = fn()
        results[name] = ctypes.get_errno() if rc < 0 else 0

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fd = sock.fileno()
    good = ctypes.create_string_buffer(b"\x02\x00\x00\x50\x0a\x01\x00\x05" + b"\x00" * 8)
    call("connect_bad_pointer", lambda: _libc.connect(fd, ctypes.c_void_p(8), 16))
    call("connect_oversized_len", lambda: _libc.connect(fd, good, 100000))
    call("bind_bad_pointer", lambda: _libc.bind(fd, ctypes.c_void_p(8), 16))
    kernel_half = ctypes.c_void_p(0xFFFF_FFFF_FFFF_0000)  # no user address is up there
    call("connect_kernel_pointer", lambda: _libc.connect(fd, kernel_half, 16))
    call(
        "getsockname_kernel_pointer",
        lambda: _libc.getsockname(fd, kernel_half, ctypes.byref(ctypes.c_uint32(16))),
    )
    call("connect_not_a_socket", lambda: _libc.connect(os.open("/dev/null", os.O_RDONLY), good, 16))
    call("connect_bad_fd", lambda: _libc.connect(9999, good, 16))
    # Which error first when several apply, in the kernel's order: the fd,
    # for bind whether it is a socket, the address, for connect the socket.
    devnull = os.open("/dev/null", os.O_RDONLY)
    call("connect_bad_fd_oversized_len", lambda: _libc.connect(9999, good, 100000))
    call("connect_not_a_socket_bad_pointer", lambda: _libc.connect(devnull, ctypes.c_void_p(8), 16))
    call("bind_not_a_socket_bad_pointer", lambda: _libc.bind(devnull, ctypes.c_void_p(8), 16))
    os.close(devnull)
    call(
        "getsockname_bad_pointer",
        lambda: _libc.getsockname(fd, ctypes.c_void_p(8), ctypes.c_void_p(8)),
    )
    # NULL pointers, as the kernel's move_addr_to_user() takes them, on a
    # socket bound to the virtual address (whose name axnet answers).
    named = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    named.bind(("0.0.0.0", 0))
    length = ctypes.c_uint32(0)
    call("getsockname_null_length", lambda: _libc.getsockname(named.fileno(), good, None))
    call(
        "getsockname_null_address_room",
        lambda: _libc.getsockname(named.fileno(), None, ctypes.byref(ctypes.c_uint32(16))),
    )
    call(
        "getsockname_null_address_no_room",
        lambda: _libc.getsockname(named.fileno(), None, ctypes.byref(length)),
    )
    results["getsockname_full_length"] = length.value
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(1)
    lfd = listener.fileno()
    call("accept4_bad_flags", lambda: _libc.accept4(lfd, None, None, 0x7FFF0000))
    # The flags are checked before whether the fd is a socket (not before the fd).
    devnull = os.open("/dev/null", os.O_RDONLY)
    call("accept4_not_a_socket_bad_flags", lambda: _libc.accept4(devnull, None, None, 0x7FFF0000))
    os.close(devnull)
    call("accept4_bad_fd_bad_flags", lambda: _libc.accept4(9999, None, None, 0x7FFF0000))
    # A blocking accept on a socket that is bound but not listening: EINVAL at
    # once, as the kernel answers (never a wait for connections).
    unlistened = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unlistened.bind(("0.0.0.0", 0))
    room = ctypes.c_uint32(16)
    peer = ctypes.create_string_buffer(16)
    call(
        "accept_not_listening",
        lambda: _libc.accept(unlistened.fileno(), peer, ctypes.byref(room)),
    )
    # A blocking connect leaves its socket connected, as the kernel's does:
    # connecting it again is EISCONN (a socket still "connecting" says 0).
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.connect(listener.getsockname())
    target = ctypes.create_string_buffer(_sockaddr_in(listener.getsockname()), 16)
    call("connect_again", lambda: _libc.connect(client.fileno(), target, 16))
    # The length is reported before the address is stored, as the kernel
    # does (move_addr_to_user): it is there even when the address faults.
    short = ctypes.c_uint32(4)
    call(
        "getsockname_null_address_short",
        lambda: _libc.getsockname(named.fileno(), None, ctypes.byref(short)),
    )
    results["getsockname_null_address_short_length"] = short.value
    # The supervisor must still answer normally afterwards.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("0.0.0.0", 0))
    results["still_working"] = int(probe.getsockname()[1] != 0)
    _out(**results, ENOENT=errno.ENOENT)


def protected_pages() -> None:
    """Socket calls whose buffers lie in pages the app may not write (or
    read); report each errno, and whether the read-only page kept its bytes."""
    results: dict[str, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    mmap, mprotect = _libc.mmap, _libc.mprotect
    mmap.restype = ctypes.c_void_p
    mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    prot_rw, prot_none = 0x1 | 0x2, 0x0
    # Four pages: writable, read-only, writable, no access.
    base = mmap(None, 4 * page, prot_rw, 0x02 | 0x20, -1, 0)  # MAP_PRIVATE | MAP_ANONYMOUS
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    rw, ro, rw2, none = base, base + page, base + 2 * page, base + 3 * page
    # The read-only page: a sane length (16) first, then a pattern.
    ctypes.memmove(ro, struct.pack("=I", 16) + b"\xaa" * (page - 4), page)
    if mprotect(ro, page, 0x1) or mprotect(none, page, prot_none):
        raise OSError(ctypes.get_errno(), "mprotect failed")

    def call(name: str, fn: Callable[[], int]) -> None:
        ctypes.set_errno(0)
        rc = fn()
        results[name] = ctypes.get_errno() if rc < 0 else 0

    def room() -> object:
        return ctypes.byref(ctypes.c_uint32(16))

    p = ctypes.c_void_p
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(4)
    lfd = listener.fileno()
    call("getsockname_read_only", lambda: _libc.getsockname(lfd, p(ro), room()))
    call("getsockname_length_read_only", lambda: _libc.getsockname(lfd, p(rw), p(ro)))
    call("getsockname_no_access", lambda: _libc.getsockname(lfd, p(none), room()))
    # A result that starts in writable memory and runs into read-only.
    call("getsockname_into_read_only", lambda: _libc.getsockname(lfd, p(ro - 8), room()))
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.connect(listener.getsockname())
    call("getpeername_read_only", lambda: _libc.getpeername(client.fileno(), p(ro), room()))
    # The kernel drops a connection whose address it cannot store.
    call("accept_read_only", lambda: _libc.accept(lfd, p(ro), room()))
    listener.setblocking(False)
    call("accept_after", lambda: _libc.accept(lfd, None, None))
    # An address whose first half is readable and whose rest is not.
    straddling = rw2 + page - 8
    ctypes.memmove(straddling, _sockaddr_in(listener.getsockname()), 8)
    for name, address in (("no_access", none), ("straddling", straddling)):
        for what, fn in (("connect", _libc.connect), ("bind", _libc.bind)):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                call(f"{what}_{name}", functools.partial(fn, sock.fileno(), p(address), 16))
    results["read_only_intact"] = int(
        ctypes.string_at(ro, page) == struct.pack("=I", 16) + b"\xaa" * (page - 4)
    )
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("0.0.0.0", 0))
    results["still_working"] = int(probe.getsockname()[1] != 0)
    _out(**results)


def _sockaddr_in(address: tuple[str, int]) -> bytes:
    host, port = address
    return b"\x02\x00" + port.to_bytes(2, "big") + socket.inet_aton(host) + bytes(8)


def unspec_bind(port: str) -> None:
    """Bind a sockaddr_in whose family was left zero (AF_UNSPEC, 0.0.0.0),
    as Linux allows on AF_INET sockets; listen; report getsockname."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw = ctypes.create_string_buffer(b"\x00\x00" + int(port).to_bytes(2, "big") + bytes(12), 16)
    ctypes.set_errno(0)
    rc = _libc.bind(sock.fileno(), raw, 16)
    if rc < 0:
        _out(errno=ctypes.get_errno())
        return
    sock.listen(8)
    _out(errno=0, sockname=_addr(sock.getsockname()))
    conn, peer = sock.accept()
    conn.sendall(json.dumps({"accepted_from": _addr(peer)}).encode())
    conn.close()


def bind_twice(port: str) -> None:
    """Bind PORT twice in one app: the second must fail as the kernel would."""
    a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    a.bind(("0.0.0.0", int(port)))
    a.listen(1)
    b = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        b.bind(("0.0.0.0", int(port)))
        _out(errno=0)
    except OSError as exc:
        _out(errno=exc.errno)


def _listener(
    family: int, host: str, port: int, *, reuseport: bool = False, v6only: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def _bind_errno(family: int, host: str, port: int, **options: bool) -> int:
    try:
        _listener(family, host, port, **options).close()
    except OSError as exc:
        return exc.errno or -1
    return 0


def _serve_from(vip: str, port: int, listeners: list[socket.socket], count: int) -> list[int]:
    """Connect to VIP:PORT COUNT times; how many connections each listener took."""
    import select

    taken = [0] * len(listeners)
    for _ in range(count):
        client = socket.create_connection((vip, port), timeout=10)
        ready, _, _ = select.select(listeners, [], [], 10)
        for sock in ready:
            conn, _ = sock.accept()
            conn.close()
            taken[listeners.index(sock)] += 1
        client.close()
    return taken


def late_reuse(port: str) -> None:
    """Binds the kernel allows whatever the order of options: SO_REUSEPORT
    set on a bound listener, then a second listener with it on PORT (nginx
    adding ``reuseport`` at a reload); two sockets with SO_REUSEADDR bound
    to PORT+1, neither listening.  Report each second bind's errno."""
    p = int(port)
    first = _listener(socket.AF_INET, "0.0.0.0", p)
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    late = _bind_errno(socket.AF_INET, "0.0.0.0", p, reuseport=True)
    unlistened = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    for sock in unlistened:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    unlistened[0].bind(("0.0.0.0", p + 1))
    try:
        unlistened[1].bind(("0.0.0.0", p + 1))
        reuseaddr = 0
    except OSError as exc:
        reuseaddr = exc.errno or -1
    _out(late_reuseport=late, reuseaddr_unlistened=reuseaddr)


def reuseport(vip: str, port: str, report: str) -> None:
    """Two listeners on VIP:PORT with SO_REUSEPORT: both bind and take
    connections; a third socket without it cannot bind; with one closed the
    other serves on (past a sweep of closed sockets).  Writes the JSON to
    REPORT, closes the second listener too and stays until REPORT is gone."""
    import time

    p = int(port)
    a = _listener(socket.AF_INET, "0.0.0.0", p, reuseport=True)
    b = _listener(socket.AF_INET, vip, p, reuseport=True)
    without = _bind_errno(socket.AF_INET, "0.0.0.0", p)
    both = _serve_from(vip, p, [a, b], 40)
    a.close()
    time.sleep(1.5)  # past the supervisor's sweep for closed sockets
    after = _serve_from(vip, p, [b], 10)
    sockname = _addr(b.getsockname())
    b.close()
    with open(report + ".tmp", "w") as f:
        json.dump({"without": without, "both": both, "after_close": after, "sockname": sockname}, f)
    os.rename(report + ".tmp", report)
    give_up = time.monotonic() + 120
    while os.path.exists(report) and time.monotonic() < give_up:
        time.sleep(0.05)


def _loopback_to(family: int, port: int, listeners: list[socket.socket]) -> list[object]:
    """Connect to loopback of *family* at *port*: which of *listeners* took
    the connection, the local address of the accepted socket and the peer
    the client sees (or the connect's errno)."""
    import select

    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        err = client.connect_ex((host, port))
        if err:
            return [err]
        ready = select.select(listeners, [], [], 10)[0]
        if not ready:
            return ["nobody accepted"]
        conn = ready[0].accept()[0]
        with conn:
            local = _addr(conn.getsockname()[:2])
            return [listeners.index(ready[0]), local, _addr(client.getpeername()[:2])]


def dual_family(vip: str, port: str) -> None:
    """Listen on [::]:PORT IPv6-only and on 0.0.0.0:PORT, as nginx's default
    site does.  The one of the family the virtual address lacks (*inert*)
    binds as on a host without such an address; the other serves."""
    p = int(port)
    v6 = _listener(socket.AF_INET6, "::", p, v6only=True)
    v4 = _listener(socket.AF_INET, "0.0.0.0", p)
    inert_family = socket.AF_INET if ":" in vip else socket.AF_INET6
    wildcard = "0.0.0.0" if inert_family == socket.AF_INET else "::"
    inert = v4 if inert_family == socket.AF_INET else v6
    shown = _addr(inert.getsockname()[:2])
    again = _bind_errno(inert_family, wildcard, p, v6only=inert_family == socket.AF_INET6)
    served = _serve_from(vip, p, [v6, v4], 5)
    loopback = _loopback_to(inert_family, p, [v6, v4])
    # An IPv6-only client reaches an IPv6 virtual address too; asked for a
    # v4-mapped one, it gets the kernel's ENETUNREACH.
    client = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    client.settimeout(10)
    v6only_client = client.connect_ex((vip if ":" in vip else "::ffff:" + vip, p))
    client.close()
    inert.close()
    rebound = _listener(inert_family, wildcard, p, v6only=inert_family == socket.AF_INET6)
    anyport = _listener(inert_family, wildcard, 0, v6only=inert_family == socket.AF_INET6)
    _out(
        inert_sockname=shown,
        inert_again=again,
        served=served,
        v6only_client=v6only_client,
        loopback=loopback,
        rebound=_addr(rebound.getsockname()[:2]),
        anyport=_addr(anyport.getsockname()[:2]),
    )


def listen_unbound(vip: str) -> None:
    """listen() on unbound sockets of each family (the kernel binds them to
    any port of the wildcard first); report where each is and, for each,
    whether a connect to the virtual address at that port reaches it."""
    out: dict[str, object] = {}
    for name, family, v6only in (
        ("inet", socket.AF_INET, None),
        ("inet6", socket.AF_INET6, 0),
        ("inet6-only", socket.AF_INET6, 1),
    ):
        sock = socket.socket(family, socket.SOCK_STREAM)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        try:
            sock.listen(4)
        except OSError as exc:
            out[name] = exc.errno
            continue
        host, port = sock.getsockname()[:2]
        with socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET) as client:
            client.settimeout(10)
            reached = client.connect_ex((vip, port)) == 0
        sock.setblocking(False)
        try:
            sock.accept()[0].close()
            accepted = True
        except BlockingIOError:
            accepted = False
        out[name] = [host, port > 0, reached and accepted]
        sock.close()
    _out(**out)


def listen_then_close(port: str, trigger: str) -> None:
    """Listen; once file TRIGGER exists close the listener, and once it is
    gone again exit (records must be withdrawn at each step)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", int(port)))
    s.listen(1)
    _out(listening=True)
    _wait_for_file(trigger, True)
    s.close()
    _out(closed=True)
    _wait_for_file(trigger, False)


def serve_one_then_close(port: str, trigger: str) -> None:
    """Accept one connection on PORT, then close the listener and keep the
    connection; once file TRIGGER exists, report the connection's names.
    With SO_REUSEADDR, as most servers (Node's included) set it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(1)
    conn, _ = listener.accept()
    listener.close()
    _out(closed=True)
    _wait_for_file(trigger, True)
    with conn:
        _out(sockname=_addr(conn.getsockname()), peername=_addr(conn.getpeername()))


def hold_names(host: str, port: str, trigger: str) -> None:
    """Connect to HOST:PORT and hold the connection; once file TRIGGER
    exists, report its names."""
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        _out(connected=True)
        _wait_for_file(trigger, True)
        _out(sockname=_addr(conn.getsockname()), peername=_addr(conn.getpeername()))


def peer_names_later(port: str, trigger: str) -> None:
    """Listen on PORT and PORT+1; accept one connection on PORT at once and
    keep it.  Once file TRIGGER exists, listen on PORT+2 (its answer comes
    after every table change before it), accept one on PORT+1 (queued
    meanwhile); report where accept said each came from, and what
    getpeername says now."""
    first = _listener(socket.AF_INET, "0.0.0.0", int(port))
    second = _listener(socket.AF_INET, "0.0.0.0", int(port) + 1)
    _out(ready=True)
    held, accepted = [], []
    conn, peer = first.accept()
    held.append(conn)
    accepted.append(_addr(peer))
    _wait_for_file(trigger, True)
    _listener(socket.AF_INET, "0.0.0.0", int(port) + 2).close()
    conn, peer = second.accept()
    held.append(conn)
    accepted.append(_addr(peer))
    _out(accepted=accepted, peernames=[_addr(c.getpeername()) for c in held])
    for conn in held:
        conn.close()


def listen_connect_close(port: str, rounds: str) -> None:
    """ROUNDS times: listen, connect to it at once, then close it and connect
    again at once; what a kernel answers: connected, then refused."""
    outcomes: dict[str, int] = {}
    for _ in range(int(rounds)):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", int(port)))
        listener.listen(8)
        address = listener.getsockname()
        for phase in ("listening", "closed"):
            try:
                socket.create_connection(address, timeout=10).close()
                outcome = f"{phase}: connected"
            except OSError as exc:
                outcome = f"{phase}: {errno.errorcode.get(exc.errno or 0, exc)}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            listener.close()
    _out(outcomes=outcomes)


def unix_paths() -> None:
    """In a directory of its own with umask 077: bind, connect and accept on a
    relative AF_UNIX path (long enough to be trapped); where and how it was made."""
    import shutil
    import stat
    import tempfile

    home = tempfile.mkdtemp(prefix="axnet-unix-")
    try:
        os.chdir(home)
        os.umask(0o077)
        name = "a-relative-socket-name.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(name)
        server.listen(1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(name)
        conn, _ = server.accept()
        client.sendall(b"ping")
        _out(
            files=sorted(os.listdir(".")),
            mode=oct(stat.S_IMODE(os.stat(name).st_mode)),
            got=conn.recv(4).decode(),
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)


def unix_backlog() -> None:
    """Blocking Unix connects to a listener whose backlog is full: one waits
    until a thread accepts, one with SO_SNDTIMEO runs out of time."""
    import struct
    import tempfile
    import time

    path = os.path.join(tempfile.mkdtemp(), "backlog.sock")  # long enough to be trapped
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    for _ in range(64):  # fill the backlog with non-blocking connects
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex(path) != 0:
            sock.close()
            break
        queued.append(sock)
    results: dict[str, object] = {"queued": len(queued)}
    timed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    timed.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("qq", 0, 300_000))
    results["with_timeout"] = timed.connect_ex(path)
    accepted = threading.Event()

    def accept_later() -> None:
        time.sleep(0.5)
        conn, _ = listener.accept()
        accepted.set()
        conn.close()

    threading.Thread(target=accept_later, daemon=True).start()
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    results["blocking"] = waiting.connect_ex(path)
    results["after_an_accept"] = accepted.is_set()
    _out(**results)


def stuck_server(port: str) -> None:
    """Listen with the smallest backlog and never accept: connects pile up and hang."""
    import time

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", int(port)))
    s.listen(0)
    _out(ready=True)
    time.sleep(3600)


def accept_pool(port: str, workers: str) -> None:
    """Blocking accepts in a pool, as thread-per-connection servers do: on
    PORT, WORKERS threads and a forked child; on PORT+1, two threads.  Each
    tells its client which worker accepted it, and from where."""
    import time

    def serve(listener: socket.socket, worker: str) -> None:
        while True:
            conn, peer = listener.accept()
            with conn:
                conn.sendall(json.dumps({"worker": worker, "accepted_from": _addr(peer)}).encode())

    first = _listener(socket.AF_INET, "0.0.0.0", int(port))
    second = _listener(socket.AF_INET, "0.0.0.0", int(port) + 1)
    if os.fork() == 0:
        serve(first, "child")
    pool = [(first, f"thread{i}") for i in range(int(workers))]
    pool += [(second, "second0"), (second, "second1")]
    for listener, worker in pool:
        threading.Thread(target=serve, args=(listener, worker), daemon=True).start()
    _out(ready=True)
    time.sleep(3600)


def accepts_then_connects(port: str, count: str) -> None:
    """COUNT threads wait in accept on PORT (0: any); then COUNT connections
    to it from this app.  Reports what each side met: "ok" or the error."""
    import time

    listener = _listener(socket.AF_INET, "0.0.0.0", int(port))
    accepted: list[str] = []
    held: list[socket.socket] = []

    def accept() -> None:
        try:
            conn, _ = listener.accept()
            held.append(conn)
            accepted.append("ok")
        except OSError as exc:
            accepted.append(exc.strerror or repr(exc))

    for _ in range(int(count)):
        threading.Thread(target=accept, daemon=True).start()
    give_up = time.monotonic() + 10
    while _threads_in_accept() < int(count) and time.monotonic() < give_up:
        time.sleep(0.05)
    address = listener.getsockname()[:2]
    connected: list[str] = []
    for _ in range(int(count)):
        try:
            held.append(socket.create_connection(address, timeout=10))
            connected.append("ok")
        except OSError as exc:
            connected.append(exc.strerror or repr(exc))
    give_up = time.monotonic() + 10
    while len(accepted) < connected.count("ok") and time.monotonic() < give_up:
        time.sleep(0.05)
    _out(connected=connected, accepted=accepted)
    os._exit(0)


def _threads_in_accept() -> int:
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                count += f.read().split()[0] in ("43", "288")  # x86_64 accept, accept4
        except (OSError, IndexError):
            pass
    return count


def accept_herd(port: str, count: str) -> None:
    """COUNT threads block in accept on one listener, then COUNT connections
    come, one after another: each thread takes one."""
    import time

    n = int(count)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(n)
    accepted: list[socket.socket] = []
    threads = [
        threading.Thread(target=lambda: accepted.append(listener.accept()[0])) for _ in range(n)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while _threads_in_accept() < n and time.monotonic() < deadline:
        time.sleep(0.01)
    parked = _threads_in_accept()
    clients = [socket.create_connection(listener.getsockname(), timeout=30) for _ in range(n)]
    for thread in threads:
        thread.join(timeout=60)
    _out(parked=parked, accepted=len(accepted))
    for sock in [*clients, *accepted]:
        sock.close()


def ask(host: str, port: str, count: str) -> None:
    """Connect to HOST:PORT COUNT times, one after another; what each server said."""
    said = []
    for _ in range(int(count)):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
        said.append(json.loads(data))
    _out(said=said)


def slow_and_fast(stuck_host: str, stuck_port: str, host: str, port: str) -> None:
    """One thread blocks in connect to a full listener; others must not wait for it."""
    import time

    _held_open = _fill_queue(stuck_host, stuck_port)  # closing them would free the queue
    state = {"stuck_done": False}

    def stuck() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # blocking, no timeout
        s.connect_ex((stuck_host, int(stuck_port)))
        state["stuck_done"] = True

    threading.Thread(target=stuck, daemon=True).start()
    time.sleep(0.5)
    times = []
    for _ in range(20):
        t0 = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.recv(4096)
        times.append(time.monotonic() - t0)
    _out(max_fast_s=max(times), stuck_still_blocked=not state["stuck_done"])
    sys.stdout.flush()
    os._exit(0)


def _fill_queue(host: str, port: str) -> list[socket.socket]:
    """Fill the accept queue of a listener that never accepts (``stuck-server``)."""
    import time

    fillers = []
    for _ in range(4):
        f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        f.setblocking(False)
        f.connect_ex((host, int(port)))
        fillers.append(f)
    time.sleep(0.3)
    return fillers


#: Syscall numbers (x86-64) of the calls `signals` interrupts.
_ACCEPTS = (43, 288)
_CONNECT = (42,)


def _until_held(tid: int, calls: tuple[int, ...], stop: threading.Event | None = None) -> bool:
    """Until thread *tid* blocks in one of *calls*, then a trapped call of
    our own: the engine takes notifications in order, so once it answers
    ours it holds the thread's.  After 30 s it goes on anyway (a count is
    off, nothing hangs); False, without the call, once *stop* is set."""
    import time

    stop = stop or threading.Event()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if stop.is_set():
            return False
        with open(f"/proc/self/task/{tid}/syscall") as f:
            number = f.read().split()[0]
        if number.isdigit() and int(number) in calls:
            break
        stop.wait(0.005)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.getsockname()
    return True


def _alarm_once_held(calls: tuple[int, ...]) -> Callable[[], None]:
    """Fire SIGALRM once the engine holds the call the main thread blocks in.

    A signal that came before the engine received the call would find it
    still queued: the kernel withdraws it and the engine never sees it.  So
    a thread waits until the main thread is blocked in one of *calls*, then
    makes a trapped call of its own: the engine receives notifications in
    order, so once that is answered it holds the earlier one.  Then a timer
    fires.  Returns what stops the thread and disarms the timer.
    """
    import signal

    tid = threading.get_native_id()
    done = threading.Event()

    def arm() -> None:
        if _until_held(tid, calls, done):
            signal.setitimer(signal.ITIMER_REAL, 0.01)

    thread = threading.Thread(target=arm, daemon=True)
    thread.start()

    def disarm() -> None:
        done.set()
        thread.join()
        signal.setitimer(signal.ITIMER_REAL, 0)

    return disarm


def signal_to_workers(port: str, workers: str = "1") -> None:
    """A signal sent to the process while the main thread blocks it and
    WORKERS threads block in accept on PORT: the kernel gives it to one of
    them, whose accept fails with EINTR (the handler is installed without
    SA_RESTART); the others wait on, and each accepts one of the clients
    that connect after.  Prints each worker's errno (0: it accepted)."""
    import signal
    import time

    signal.signal(signal.SIGUSR1, lambda *_: None)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(8)
    errnos: list[int] = []
    tids: list[int] = []
    started = threading.Barrier(int(workers) + 1)

    def worker() -> None:
        tids.append(threading.get_native_id())
        started.wait()
        ctypes.set_errno(0)
        rc = _libc.accept(listener.fileno(), None, None)
        errnos.append(ctypes.get_errno() if rc < 0 else 0)
        if rc >= 0:
            os.close(rc)

    # Threads inherit the mask: start the workers unblocked, then block here.
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(int(workers))]
    for thread in threads:
        thread.start()
    started.wait()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    deadline = time.monotonic() + 30
    for tid in tids:  # until every worker blocks in accept
        while time.monotonic() < deadline:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                if f.read().split()[0] in ("43", "288"):
                    break
            time.sleep(0.005)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.getsockname()  # answered after the engine took the accepts: it holds them
    os.kill(os.getpid(), signal.SIGUSR1)
    while time.monotonic() < deadline and not errnos:  # the one the kernel picked
        time.sleep(0.005)
    time.sleep(0.5)  # more than a slice of the engine's checks: any other would be out
    interrupted_alone = len(errnos) == 1
    clients = []
    for _ in range(int(workers) - len(errnos)):
        clients.append(socket.create_connection(listener.getsockname(), timeout=10))
    for thread in threads:
        thread.join(10)
    for client in clients:
        client.close()
    _out(accept_errnos=sorted(errnos), interrupted_alone=interrupted_alone)


def signals(port: str, stuck_host: str, stuck_port: str) -> None:
    """A timer signal during a blocking accept and a blocking connect.

    Without SA_RESTART (Python's default) the handler runs and its exception
    ends the call; with SA_RESTART the call carries on after the handler.
    """
    import select
    import signal
    import struct

    class Alarm(Exception):
        pass

    def alarm(signum: int, frame: object) -> None:
        raise Alarm

    def interrupted(call: Callable[[], object], calls: tuple[int, ...]) -> bool:
        disarm = _alarm_once_held(calls)
        try:
            call()
        except Alarm:
            return True
        finally:
            disarm()
        return False

    signal.signal(signal.SIGALRM, alarm)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(8)
    accept_interrupted = interrupted(listener.accept, _ACCEPTS)
    fillers = _fill_queue(stuck_host, stuck_port)
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # blocking, no timeout
    connect_interrupted = interrupted(
        lambda: stuck.connect((stuck_host, int(stuck_port))), _CONNECT
    )

    ran: list[int] = []
    signal.signal(signal.SIGALRM, lambda signum, frame: ran.append(signum))
    signal.siginterrupt(signal.SIGALRM, False)  # SA_RESTART
    # The signal's arrival, seen at once (Python runs the handler itself only
    # once accept returns): a client connects only after it, so the accept
    # is still parked when the signal comes.
    arrived, wakeup = os.pipe()
    os.set_blocking(wakeup, False)
    signal.set_wakeup_fd(wakeup)
    me = listener.getsockname()
    seen: dict[str, bool] = {}

    def connect_once_signalled() -> None:
        seen["signal_arrived_first"] = bool(select.select([arrived], [], [], 30)[0])
        socket.create_connection(me, timeout=10).close()

    threading.Thread(target=connect_once_signalled, daemon=True).start()
    disarm = _alarm_once_held(_ACCEPTS)
    conn, peer = listener.accept()
    disarm()
    conn.close()
    # With a socket timeout the kernel never restarts: EINTR, SA_RESTART or not.
    timed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    timed.bind(("0.0.0.0", int(port) + 1))
    timed.listen(8)
    timed.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 30, 0))
    disarm = _alarm_once_held(_ACCEPTS)
    ctypes.set_errno(0)
    timed_rc = _libc.accept(timed.fileno(), None, None)
    timed_errno = ctypes.get_errno() if timed_rc < 0 else 0
    disarm()
    _out(
        accept_interrupted=accept_interrupted,
        connect_interrupted=connect_interrupted,
        restarted_accept_from=_addr(peer),
        handler_ran=ran == [signal.SIGALRM, signal.SIGALRM],
        fillers=len(fillers),
        timed_accept_errno=timed_errno,
        **seen,
    )


def accept_without_fds(port: str, mode: str = "blocking") -> None:
    """Accept with no fd free (EMFILE), then again with room: the connection
    waits.  MODE "epoll": a non-blocking listener, accepted from only when
    epoll says it is readable, as nginx and asyncio do; then it must say so
    again for the connection that waits, and any later readiness must bring
    no connection that was never made.  MODE "short": the first accept asks
    for 4 bytes of the address (``*addrlen`` = 4), with a pattern after
    them; reported: the length after the call and whether the pattern held."""
    import resource
    import selectors

    short = mode == "short"
    if short:
        mode = "blocking"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mode == "deferred":  # epoll, and TCP_DEFER_ACCEPT (nginx's "deferred")
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
        mode = "epoll"
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(8)
    poller = selectors.DefaultSelector()
    if mode == "epoll":
        listener.setblocking(False)
        poller.register(listener, selectors.EVENT_READ)

    def readable(timeout: float) -> bool:
        return mode != "epoll" or bool(poller.select(timeout))

    client = socket.create_connection(listener.getsockname(), timeout=10)
    client.sendall(b"hello")
    # Take every free fd number up to the highest in use, then set the limit
    # just above: no fd is left for the accepted connection.
    top = max(int(name) for name in os.listdir("/proc/self/fd"))
    held = [os.dup(0)]
    while held[-1] <= top:
        held.append(os.dup(0))
    fd = held[-1]
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd + 1, limits[1]))
    ready_first = readable(10)
    room = ctypes.c_uint32(4)
    buffer = ctypes.create_string_buffer(b"\xaa" * 32, 32)
    try:
        if short:
            ctypes.set_errno(0)
            if _libc.accept(listener.fileno(), buffer, ctypes.byref(room)) < 0:
                raise OSError(ctypes.get_errno(), "accept")
        else:
            listener.accept()
        first = 0
    except OSError as exc:
        first = exc.errno or 0
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    for fd in held:
        os.close(fd)
    ready_then = readable(10)
    conn, peer = listener.accept()
    conn.setblocking(True)
    got = conn.recv(5).decode()
    extra = "none"
    if mode == "epoll" and readable(1):
        try:
            listener.accept()
            extra = "connection"
        except BlockingIOError:
            extra = "EAGAIN"
    _out(
        first_errno=first,
        then_got=got,
        peer=_addr(peer),
        readable=[ready_first, ready_then],
        extra=extra,
        **(
            {"room_after": room.value, "past_room_intact": buffer.raw[4:] == b"\xaa" * 28}
            if short
            else {}
        ),
    )


def room_while_waiting(port: str) -> None:
    """A thread blocks in accept on PORT with ``*addrlen`` = 16; while it
    waits the app makes that 4 (the kernel reads it after the wait), then
    connects.  Reports the length after the call and whether the bytes past
    the 4 kept their pattern."""
    listener = _listener(socket.AF_INET, "0.0.0.0", int(port))
    room = ctypes.c_uint32(16)
    buffer = ctypes.create_string_buffer(b"\xaa" * 32, 32)
    accepted: list[int] = []
    thread = threading.Thread(
        target=lambda: accepted.append(_libc.accept(listener.fileno(), buffer, ctypes.byref(room)))
    )
    thread.start()
    assert thread.native_id is not None
    _until_held(thread.native_id, _ACCEPTS)
    room.value = 4
    with socket.create_connection(listener.getsockname(), timeout=10):
        thread.join(30)
    _out(
        accepted=bool(accepted and accepted[0] >= 0),
        room_after=room.value,
        past_room_intact=buffer.raw[4:] == b"\xaa" * 28,
    )


def bind_in_a_thread(port: str, seconds: str) -> None:
    """Bind in a thread that then ends; listen in the main thread SECONDS later."""
    import time

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    binder = threading.Thread(target=lambda: sock.bind(("0.0.0.0", int(port))))
    binder.start()
    binder.join()
    time.sleep(float(seconds))
    sock.listen(8)
    _out(listening=_addr(sock.getsockname()))
    time.sleep(600)


def bind_after_a_thread(port: str) -> None:
    """A thread binds PORT and ends; the main thread binds PORT again."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    binder = threading.Thread(target=lambda: held.bind(("0.0.0.0", int(port))))
    binder.start()
    binder.join()
    again = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        again.bind(("0.0.0.0", int(port)))
        _out(errno=0, held=_addr(held.getsockname()))
    except OSError as exc:
        _out(errno=exc.errno, held=_addr(held.getsockname()))


def listen_backlog(port: str, backlog: str) -> None:
    """listen(2) with BACKLOG as given (CPython would clamp a negative one)."""
    import time

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", int(port)))
    rc = _libc.listen(sock.fileno(), int(backlog))
    _out(listened=rc == 0)
    time.sleep(600)


def socket_timeouts(port: str, stuck_host: str, stuck_port: str) -> None:
    """Blocking accept with SO_RCVTIMEO, blocking connect with SO_SNDTIMEO
    (twice: the second finds the socket connecting still)."""
    import struct

    quarter_second = struct.pack("@ll", 0, 250_000)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(8)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, quarter_second)
    results: dict[str, int] = {}
    try:
        listener.accept()
        results["accept"] = 0
    except OSError as exc:
        results["accept"] = exc.errno or 0
    _held_open = _fill_queue(stuck_host, stuck_port)  # closing them would free the queue
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, quarter_second)
    for name in ("connect", "connect_again"):  # again: it is connecting already
        try:
            stuck.connect((stuck_host, int(stuck_port)))
            results[name] = 0
        except OSError as exc:
            results[name] = exc.errno or 0
    _out(**results)


def shutdown_listener(port: str) -> None:
    """Listen on PORT, shut the listener down (SHUT_RD: it stops listening,
    still bound), wait past the supervisor's sweep, listen on it again; where
    getsockname says it is at each step, and whether a client reaches it."""
    import time

    listener = _listener(socket.AF_INET, "0.0.0.0", int(port))
    named = [_addr(listener.getsockname())]
    listener.shutdown(socket.SHUT_RD)
    time.sleep(1.5)  # past the supervisor's sweep for closed sockets
    named.append(_addr(listener.getsockname()))
    listener.listen(8)
    named.append(_addr(listener.getsockname()))
    vip = str(named[0][0]) if named[0][0] != "0.0.0.0" else "127.0.0.1"
    with socket.create_connection((vip, int(port)), timeout=10) as client:
        listener.settimeout(10)
        conn, peer = listener.accept()
        conn.close()
        _out(named=named, peer_is_client=_addr(peer) == _addr(client.getsockname()))


def rebind(port: str) -> None:
    """Listen, close, listen again on the same port at once (as iperf3 does)."""
    errors = []
    for _ in range(3):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", int(port)))
            s.listen(1)
        except OSError as exc:
            errors.append(exc.errno)
        s.close()
    _out(errors=errors)


def shutdown_while_connecting(stuck_host: str, stuck_port: str) -> None:
    """A thread blocks in connect to a listener whose queue is full; the main
    thread shuts that socket down.  The kernel wakes the connect, which fails
    (ECONNRESET) and leaves the socket closed, not connecting anew.  Prints
    the connect's errno and the socket's TCP state then (7: closed)."""
    import struct

    _held_open = _fill_queue(stuck_host, stuck_port)  # closing them would free the queue
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    result: dict[str, int] = {}
    tids: list[int] = []
    started = threading.Event()

    def worker() -> None:
        tids.append(threading.get_native_id())
        started.set()
        result["connect"] = sock.connect_ex((stuck_host, int(stuck_port)))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    started.wait()
    _until_held(tids[0], _CONNECT)
    sock.shutdown(socket.SHUT_RDWR)
    thread.join(30)
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    _out(tcp_state=struct.unpack("B", info[:1])[0], **result)


def two_connects(stuck_host: str, stuck_port: str, trigger: str) -> None:
    """Two threads block in connect on one socket, to a listener whose queue
    is full (``accept-later``), which starts accepting once both wait (at
    TRIGGER): the kernel ends both connects with 0.  Prints their errnos."""
    _held_open = _fill_queue(stuck_host, stuck_port)  # closing them would free the queue
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    errnos: list[int] = []
    tids: list[int] = []
    threads = []
    for _ in range(2):
        started = threading.Event()

        def worker(started: threading.Event = started) -> None:
            tids.append(threading.get_native_id())
            started.set()
            errnos.append(sock.connect_ex((stuck_host, int(stuck_port))))

        threads.append(threading.Thread(target=worker, daemon=True))
        threads[-1].start()
        started.wait()
        _until_held(tids[-1], _CONNECT)
    open(trigger, "w").close()
    for thread in threads:
        thread.join(60)
    _out(errnos=errnos)


def accept_later(port: str, trigger: str) -> None:
    """Listen with the smallest backlog; once TRIGGER exists, accept for good."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", int(port)))
    s.listen(0)
    _out(ready=True)
    _wait_for_file(trigger, True)
    while True:
        s.accept()[0].close()


def late_timeout(port: str) -> None:
    """A thread blocks in accept on PORT; then the main thread gives the
    listener SO_RCVTIMEO (0.25 s).  The kernel reads the timeout once, when
    accept starts: the accept blocks on past it, until a signal (a handler
    with SA_RESTART) makes the kernel start it again, with the timeout this
    time: it fails with EAGAIN, not EINTR.  Prints whether it still blocked
    before the signal, and its errno."""
    import signal
    import struct
    import time

    ran: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: ran.append(signum))
    signal.siginterrupt(signal.SIGUSR1, False)  # SA_RESTART
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(8)
    result: dict[str, object] = {}
    tids: list[int] = []
    started = threading.Event()

    def worker() -> None:
        tids.append(threading.get_native_id())  # for /proc
        started.set()
        ctypes.set_errno(0)
        rc = _libc.accept(listener.fileno(), None, None)
        result["accept_errno"] = ctypes.get_errno() if rc < 0 else 0

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    started.wait()
    _until_held(tids[0], _ACCEPTS)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 250_000))
    time.sleep(1)  # four times that timeout, five slices of the engine's checks
    result["blocked_past_timeout"] = "accept_errno" not in result
    assert thread.ident is not None
    signal.pthread_kill(thread.ident, signal.SIGUSR1)
    thread.join(30)
    _out(handler_ran=bool(ran), **result)


def pass_listener(path: str, port: str) -> None:
    """Listen on PORT, hand the listener over SCM_RIGHTS to the process
    listening at unix PATH (``take-listener``), close our copy, and exit once
    that process hangs up."""
    import time

    listener = _listener(socket.AF_INET, "0.0.0.0", int(port))
    carrier = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    give_up = time.monotonic() + 120
    while True:
        try:
            carrier.connect(path)
            break
        except OSError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.05)
    socket.send_fds(carrier, [b"L"], [listener.fileno()])
    listener.close()
    _out(passed=True)
    carrier.recv(1)


def take_listener(path: str) -> None:
    """Take a listener over SCM_RIGHTS at unix PATH (from ``pass-listener``),
    tell one client what accept returned and what the connection's names
    are, then hang up."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    carrier, _ = server.accept()
    _, fds, _, _ = socket.recv_fds(carrier, 1, 1)
    listener = socket.socket(fileno=fds[0])
    conn, peer = listener.accept()
    with conn:
        body = {
            "accepted_from": _addr(peer),
            "peername": _addr(conn.getpeername()),
            "sockname": _addr(conn.getsockname()),
            "listener": _addr(listener.getsockname()),
        }
        conn.sendall(json.dumps(body).encode())
    _out(**body)
    carrier.close()


#: The first fd of those socket activation passes (sd_listen_fds(3)).
LISTEN_FDS_START = 3


def activate(port: str, *argv: str) -> None:
    """Socket activation, as systemd-socket-activate does it: listen on
    127.0.0.1:PORT, pass the listener as fd 3 with LISTEN_FDS=1 and
    LISTEN_PID set to this process, and exec ARGV (which keeps the pid)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(8)
    if listener.fileno() != LISTEN_FDS_START:
        os.dup2(listener.fileno(), LISTEN_FDS_START)  # inheritable
        listener.close()
    else:
        os.set_inheritable(LISTEN_FDS_START, True)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    os.execvp(argv[0], list(argv))


def activated() -> None:
    """The activated side: take the listener as sd_listen_fds(3) would (only
    when LISTEN_PID names this process), serve one connection of its own on
    it, close it, and report whether a connect to it is refused then."""
    mine = os.environ.get("LISTEN_PID") == str(os.getpid())
    result: dict[str, object] = {
        "listen_pid_mine": mine,
        "listen_fds": os.environ.get("LISTEN_FDS"),
    }
    listener = socket.socket(fileno=LISTEN_FDS_START)
    address = listener.getsockname()
    result["sockname"] = _addr(address)
    with socket.create_connection(address, timeout=10) as client:
        conn, peer = listener.accept()
        result["accepted_from"] = _addr(peer)
        result["client"] = _addr(client.getsockname())
        conn.close()
    listener.close()
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(10)
    result["connect_after_close"] = probe.connect_ex(address)
    probe.close()
    _out(**result)


COMMANDS: dict[str, Callable[..., None]] = {
    "rebind": rebind,
    "late-reuse": late_reuse,
    "shutdown-listener": shutdown_listener,
    "stuck-server": stuck_server,
    "accept-pool": accept_pool,
    "accept-herd": accept_herd,
    "ask": ask,
    "slow-and-fast": slow_and_fast,
    "signals": signals,
    "signal-to-workers": signal_to_workers,
    "socket-timeouts": socket_timeouts,
    "late-timeout": late_timeout,
    "two-connects": two_connects,
    "accept-later": accept_later,
    "shutdown-while-connecting": shutdown_while_connecting,
    "accept-without-fds": accept_without_fds,
    "room-while-waiting": room_while_waiting,
    "listen-backlog": listen_backlog,
    "bind-in-a-thread": bind_in_a_thread,
    "bind-after-a-thread": bind_after_a_thread,
    "names": names,
    "names-after": names_after,
    "greeter": greeter,
    "connect-errno": connect_errno,
    "connect-elsewhere": connect_elsewhere,
    "name-later": name_later,
    "open-connections": open_connections,
    "bound-connections": bound_connections,
    "node-ports": node_ports,
    "reopen-connections": reopen_connections,
    "threads": threads,
    "spaced": spaced,
    "thread-after-thread": thread_after_thread,
    "accepts-then-connects": accepts_then_connects,
    "serve-one-then-close": serve_one_then_close,
    "hold-names": hold_names,
    "peer-names-later": peer_names_later,
    "asyncio-clients": asyncio_clients,
    "trio-clients": trio_clients,
    "fork-connect": fork_connect,
    "exec-names": exec_names,
    "exec-rebind": exec_rebind,
    "io-uring": io_uring,
    "fastopen": fastopen,
    "hostile": hostile,
    "protected-pages": protected_pages,
    "bind-twice": bind_twice,
    "reuseport": reuseport,
    "dual-family": dual_family,
    "listen-unbound": listen_unbound,
    "unspec-bind": unspec_bind,
    "listen-then-close": listen_then_close,
    "listen-connect-close": listen_connect_close,
    "unix-paths": unix_paths,
    "unix-backlog": unix_backlog,
    "activate": activate,
    "pass-listener": pass_listener,
    "take-listener": take_listener,
    "activated": activated,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m axnet.testing.apps {{{','.join(COMMANDS)}}} ARGS")
    COMMANDS[sys.argv[1]](*sys.argv[2:])
