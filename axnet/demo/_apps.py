"""The demo's apps: plain socket programs that know nothing of axnet.

``python -m axnet.demo._apps serve NAME`` listens on port 80 of every address
and answers each request with JSON: its name, what ``getsockname`` and
``accept`` told it.  ``python -m axnet.demo._apps fetch HOST...`` connects to
each ``HOST:80`` in turn and prints JSON for each: what its own
``getsockname``/``getpeername`` returned and the server's answer, or the
error its connect met.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def serve(name: str, port: int = 80) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    print(json.dumps({"serving": name, "sockname": _endpoint(listener.getsockname())}), flush=True)
    while True:
        conn, peer = listener.accept()
        with conn:
            conn.recv(4096)
            body = json.dumps(
                {
                    "server": name,
                    "server_sockname": _endpoint(conn.getsockname()),
                    "accepted_from": _endpoint(peer),
                }
            ).encode()
            conn.sendall(
                b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


def fetch(host: str, port: int = 80) -> None:
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=5) as conn:
            mine, theirs = conn.getsockname(), conn.getpeername()
            conn.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
    except OSError as exc:  # what the app saw is the point: report it
        reason = exc.strerror or str(exc)
        _report(target=host, error=reason.lower(), ms=_ms_since(started))
        return
    _, _, body = data.partition(b"\r\n\r\n")
    _report(
        target=host,
        client_sockname=_endpoint(mine),
        client_peername=_endpoint(theirs),
        response=json.loads(body),
        ms=_ms_since(started),
    )


def _endpoint(address: tuple[str, int]) -> str:
    """``host:port`` (``[v6]:port``), as axnet's own listings write addresses."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "fetch":
        for target in sys.argv[2:]:
            fetch(target)
    else:
        sys.exit("usage: python -m axnet.demo._apps serve NAME | fetch HOST...")
