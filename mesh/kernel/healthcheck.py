"""kube-proxy's ``healthCheckNodePort`` servers on the kernel data path.

For a LoadBalancer Service with ``externalTrafficPolicy: Local`` kube-proxy answers on every
node, at the node's address and the Service's health check port, whether that node has a
ready local endpoint: ``200`` and ``{"localEndpoints": N}`` if it has, ``503`` if not —
how a cloud load balancer learns which nodes to send to. Here each server listens inside
its node's namespace (the socket is made there), so the node's own address answers, as on a
real node; the host's forwarder passes the lab's node addresses on (``127.10.0.N:PORT``).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mesh.kernel.forward import socket_in
from mesh.kubeproxy.rules import HealthCheck, RuleSet, health_check_reply

log = logging.getLogger("kube-proxy")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, check: Callable[[], HealthCheck | None]) -> None:
        super().__init__(sock.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.check = check


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        status, body = health_check_reply(self.server.check())
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class HealthCheckServers:
    """One server per (node address, port) the rule set names; kept in step with it."""

    def __init__(self, netns_of: Callable[[str], str]) -> None:
        self.netns_of = netns_of
        """Node name → its network namespace."""
        self._rules = RuleSet()
        self._servers: dict[tuple[str, int], _Server] = {}
        self._lock = threading.Lock()

    def sync(self, rules: RuleSet) -> None:
        """Start the servers ``rules`` asks for, stop the ones it no longer names."""
        self._rules = rules
        with self._lock:
            for key in [k for k in self._servers if k not in rules.health_checks]:
                server = self._servers.pop(key)
                server.shutdown()
                server.server_close()
            for key, check in rules.health_checks.items():
                if key not in self._servers:
                    self._start(key, check.node)

    def _start(self, key: tuple[str, int], node: str) -> None:
        sock = socket_in(self.netns_of(node))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(key)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            log.warning(
                "cannot serve a health check node port",
                extra={"node": node, "address": f"{key[0]}:{key[1]}", "error": str(exc)},
            )
            return
        server = _Server(sock, lambda: self._rules.health_checks.get(key))
        threading.Thread(target=server.serve_forever, name=f"hc-{key[1]}", daemon=True).start()
        self._servers[key] = server

    def stop(self) -> None:
        self.sync(RuleSet())
