"""Tiny programs the kernel data-path tests run inside pod namespaces.

``python -m tests.kernel_probe serve PORT``: accept forever; answer each connection with
one JSON line naming the peer address the server saw, then close.
``python -m tests.kernel_probe connect IP PORT [COUNT]``: open COUNT connections one after
the other; print one JSON line per attempt (local address, the server's view of it, or the
errno name and how long the failure took).
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import time


def serve(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(128)
    print(json.dumps({"listening": port}), flush=True)
    while True:
        conn, peer = listener.accept()
        with conn:
            local = conn.getsockname()
            conn.sendall(
                json.dumps(
                    {"peer": f"{peer[0]}:{peer[1]}", "server": f"{local[0]}:{local[1]}"}
                ).encode()
                + b"\n"
            )


def connect(ip: str, port: int, count: int) -> None:
    for _ in range(count):
        started = time.perf_counter()
        result: dict[str, object] = {}
        try:
            with socket.create_connection((ip, port), timeout=3) as conn:
                local = conn.getsockname()
                result["local"] = f"{local[0]}:{local[1]}"
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                result.update(json.loads(reply))
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.ETIMEDOUT
            result["error"] = errno.errorcode.get(code, str(code))
        result["ms"] = round((time.perf_counter() - started) * 1000, 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        connect(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1)
