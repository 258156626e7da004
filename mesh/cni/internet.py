"""The playground's internet: servers on addresses outside every cluster range.

``payments.example.net`` (127.50.0.10:8080) stands for a SaaS API the shop depends on. It
answers every request with JSON naming the address the request came from — after egress
SNAT that is the node's egress IP, never a pod IP — and has no telemetry of its own, like a
third party: what happened inside it is not in the trace.
"""

from __future__ import annotations

import argparse
import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mesh import addresses

log = logging.getLogger("internet")

PAYMENTS_PORT = 8080


class _Handler(BaseHTTPRequestHandler):
    server_version = "payments-example/1.0"
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if 0 < length <= 1 << 20:
            self.rfile.read(length)
        body = json.dumps(
            {
                "service": "payments.example.net",
                "path": self.path,
                "client_address": self.client_address[0],
                "status": "authorized",
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        log.info("request", extra={"client": self.client_address[0], "line": self.requestline})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mesh.cni.internet", description=__doc__)
    parser.add_argument("--address", default=addresses.EXTERNAL_HOSTS["payments.example.net."])
    parser.add_argument("--port", type=int, default=PAYMENTS_PORT)
    args = parser.parse_args(argv)
    from telemetry.logs import setup_json_logging

    setup_json_logging({"component": "internet"})
    server = ThreadingHTTPServer((args.address, args.port), _Handler)
    server.daemon_threads = True
    log.info("serving", extra={"address": f"{args.address}:{args.port}"})
    server.serve_forever()


if __name__ == "__main__":
    main()
