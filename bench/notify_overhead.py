"""Added latency of one intercepted connect(): native vs. a minimal notify loop.

Runs the same client twice against one loopback listener: once plain, once
under the axnet filter with a supervisor loop in this process that does what
the real one must at least do (recv -> read_memory -> decode -> pidfd_getfd ->
connect the app's socket -> respond).  Prints the client-side connect() time
p50/p99 for both, the difference, and the supervisor's cost per primitive.

    /opt/axnet-dev/bin/python bench/notify_overhead.py [N] [--sync-wakeup]
"""

from __future__ import annotations

import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from axnet.intercept._bpf import NR_CONNECT, build_filter
from axnet.intercept._decode import decode_sockaddr
from axnet.intercept._launcher import launch
from axnet.intercept._libc import pidfd_getfd, pidfd_open, read_memory

CLIENT = """
import json, socket, sys, time
port, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
times = []
for _ in range(n):
    s = socket.socket()
    t0 = time.perf_counter_ns()
    s.connect(("127.0.0.1", port))
    times.append(time.perf_counter_ns() - t0)
    s.close()
with open(out, "w") as f:
    json.dump(times, f)
"""
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def pct(values: list[int], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] / 1000


def drain(listener: socket.socket) -> None:
    listener.setblocking(False)
    try:
        while True:
            listener.accept()[0].close()
    except BlockingIOError:
        pass


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2000
    sync = "--sync-wakeup" in sys.argv
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(socket.SOMAXCONN)
    port = listener.getsockname()[1]
    out = tempfile.mktemp(prefix="axnet-bench-")
    argv = [PYTHON, "-I", "-c", CLIENT, str(port), str(n), out]

    subprocess.run(argv, check=True, timeout=120)
    with open(out) as f:
        native: list[int] = json.load(f)
    drain(listener)

    launched = launch(argv, env=None, program=build_filter())
    notify = launched.notify
    if sync:
        notify.set_sync_wakeup()
    cost = {"recv": 0, "read_memory+decode": 0, "pidfd_getfd": 0, "connect": 0, "respond": 0}
    pidfds: dict[int, int] = {}
    poller = select.poll()
    poller.register(notify.fileno(), select.POLLIN)
    handled = 0
    pc = time.perf_counter_ns
    try:
        while True:
            events = poller.poll(10_000)
            if not events or not events[0][1] & select.POLLIN:
                break
            t0 = pc()
            note = notify.recv()
            t1 = pc()
            if note.nr != NR_CONNECT:
                notify.respond_continue(note.id)
                continue
            decode_sockaddr(read_memory(note.pid, note.args[1], note.args[2]))
            t2 = pc()
            pidfd = pidfds.get(note.pid)
            if pidfd is None:
                pidfd = pidfds[note.pid] = pidfd_open(note.pid)
            fd = pidfd_getfd(pidfd, note.args[0])
            t3 = pc()
            sock = socket.socket(fileno=fd)
            sock.connect(("127.0.0.1", port))
            sock.detach()
            os.close(fd)
            t4 = pc()
            notify.respond(note.id)
            t5 = pc()
            cost["recv"] += t1 - t0
            cost["read_memory+decode"] += t2 - t1
            cost["pidfd_getfd"] += t3 - t2
            cost["connect"] += t4 - t3
            cost["respond"] += t5 - t4
            handled += 1
        os.waitpid(launched.pid, 0)
    finally:
        notify.close()
        os.close(launched.pidfd)
        for fd in pidfds.values():
            os.close(fd)
        listener.close()
    with open(out) as f:
        trapped: list[int] = json.load(f)
    os.unlink(out)

    print(f"connects: {n} native, {handled} intercepted (sync wake-up: {sync})")
    for name, values in (("native", native), ("intercepted", trapped)):
        print(f"  {name:12s} p50 {pct(values, 0.5):8.1f} us  p99 {pct(values, 0.99):8.1f} us")
    print(
        f"  added        p50 {pct(trapped, 0.5) - pct(native, 0.5):8.1f} us"
        f"  p99 {pct(trapped, 0.99) - pct(native, 0.99):8.1f} us"
        f"  ratio p50 {statistics.median(trapped) / statistics.median(native):.2f}"
    )
    print("supervisor cost per intercepted connect (mean):")
    for name, total in cost.items():
        print(f"  {name:20s} {total / max(handled, 1) / 1000:6.2f} us")


if __name__ == "__main__":
    main()
