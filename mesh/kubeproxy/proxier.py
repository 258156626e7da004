"""The proxier: listeners on every Service VIP:port, the DNAT decision, the conntrack table.

State arrives from the watch (another thread) and is coalesced into one ``sync()`` on the
event loop, as kube-proxy's ``BoundedFrequencyRunner`` does: the rule set is rebuilt from the
whole state, listeners are opened/closed to match, and the new rules replace the old in one
assignment, so a connection always sees one consistent rule set.

A new connection is "DNATed" at accept time, before any byte is read — like the first SYN
hitting the nat table: the endpoint is chosen among *ready* endpoints, and the upstream
socket is bound to the client's own address (ClusterIP traffic keeps its source; DNAT only).
A VIP with no ready endpoint resets the connection at once, like kube-proxy's REJECT rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
from collections import deque
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from mesh import addresses
from mesh.kubeproxy.hop import ConnInfo
from mesh.kubeproxy.relays import READ_SIZE, HTTP1Relay, HTTP2Relay, relay_tcp, sniff
from mesh.kubeproxy.rules import EndpointTarget, RuleSet, Selector, ServiceRule, build_rules
from mesh.model.types import ClusterState

log = logging.getLogger("kube-proxy")

SNIFF_TIMEOUT = 1.0
"""Seconds to wait for a client's first bytes before treating the stream as opaque TCP."""

CLOSED_KEEP = 512
"""Closed connections kept for ``/conntrack`` (like conntrack's TIME_WAIT entries)."""

ESTABLISHED_TIMEOUT = 432000
"""nf_conntrack_tcp_timeout_established (5 days), in seconds."""

TIME_WAIT_TIMEOUT = 120
"""nf_conntrack_tcp_timeout_time_wait, in seconds."""

SYNC_DURATION = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds",
    buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512),
)
NETWORK_PROGRAMMING = Histogram(
    "kubeproxy_network_programming_duration_seconds",
    "In-cluster network programming latency in seconds",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LAST_SYNC = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced",
)
RULES = Gauge("hopscope_kubeproxy_service_ports", "Proxied Service VIP:port pairs")
CONNECTIONS = Counter(
    "hopscope_kubeproxy_connections",
    "Connections DNATed to an endpoint",
    ["namespace", "service", "endpoint_pod"],
)
ACTIVE = Gauge(
    "hopscope_kubeproxy_active_connections", "Open proxied connections", ["namespace", "service"]
)
BYTES = Counter(
    "hopscope_kubeproxy_bytes",
    "Bytes proxied per endpoint (in: client to endpoint, out: endpoint to client)",
    ["namespace", "service", "endpoint_pod", "direction"],
)
REJECTED = Counter(
    "hopscope_kubeproxy_rejected_connections",
    "Connections refused (no ready endpoint, endpoint unreachable, unknown VIP)",
    ["namespace", "service", "reason"],
)


def _remaining(conn: ConnInfo, now: float) -> int:
    """Seconds left on the entry: 5 days while open (ESTABLISHED), 120 s after close."""
    if conn.closed is None:
        return ESTABLISHED_TIMEOUT
    return max(0, TIME_WAIT_TIMEOUT - round(now - conn.closed))


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the client sees 'connection refused/reset' at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


class Proxier:
    def __init__(self, tracer: Any, selector: Selector, min_sync_period: float = 0.0) -> None:
        self.tracer = tracer
        self.selector = selector
        self.min_sync_period = min_sync_period
        self.rules = RuleSet()
        self.listeners: dict[tuple[str, int], asyncio.Server] = {}
        self.conntrack: dict[int, ConnInfo] = {}
        self.closed: deque[ConnInfo] = deque(maxlen=CLOSED_KEEP)
        self.synced_at: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._pending: tuple[ClusterState, float] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._last_sync = 0.0
        self.bind_errors: dict[str, str] = {}

    # -- sync ------------------------------------------------------------------------------

    def on_state(self, state: ClusterState) -> None:
        """Called from the watch thread with each new state."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._state_arrived, state, time.monotonic())

    def _state_arrived(self, state: ClusterState, received: float) -> None:
        self._pending = (state, received)
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.ensure_future(self._sync_soon())

    async def _sync_soon(self) -> None:
        wait = self.min_sync_period - (time.monotonic() - self._last_sync)
        if wait > 0:
            await asyncio.sleep(wait)
        while self._pending is not None:
            state, received = self._pending
            self._pending = None
            await self.sync(state)
            NETWORK_PROGRAMMING.observe(time.monotonic() - received)

    async def sync(self, state: ClusterState) -> None:
        start = time.perf_counter()
        new = build_rules(state)
        for key in [k for k in self.listeners if k not in new.rules]:
            self.listeners.pop(key).close()
        for key, rule in new.rules.items():
            if key not in self.listeners:
                await self._listen(rule)
        self.rules = new
        RULES.set(len(new.rules))
        self._last_sync = time.monotonic()
        self.synced_at = time.time()
        LAST_SYNC.set(self.synced_at)
        SYNC_DURATION.observe(time.perf_counter() - start)
        log.info(
            "synced proxy rules",
            extra={
                "resource_version": new.version,
                "service_ports": len(new.rules),
                "duration_ms": round((time.perf_counter() - start) * 1000, 3),
            },
        )

    async def _listen(self, rule: ServiceRule) -> None:
        try:
            server = await asyncio.start_server(
                self.handle, rule.vip, rule.port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            self.bind_errors[f"{rule.vip}:{rule.port}"] = str(exc)
            log.error(
                "cannot listen on Service VIP",
                extra={
                    "service": rule.service,
                    "vip": f"{rule.vip}:{rule.port}",
                    "error": str(exc),
                },
            )
            return
        self.bind_errors.pop(f"{rule.vip}:{rule.port}", None)
        self.listeners[rule.key] = server

    # -- connections -------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        vip, port = writer.get_extra_info("sockname")[:2]
        client_ip, client_port = writer.get_extra_info("peername")[:2]
        rule = self.rules.rules.get((vip, port))
        if rule is None:
            REJECTED.labels("", "", "no-service").inc()
            _reset(writer)
            return
        endpoint = self.selector.choose(rule, client_ip)
        if endpoint is None:
            REJECTED.labels(rule.namespace, rule.name, "no-ready-endpoints").inc()
            log.info(
                "rejected: no ready endpoints",
                extra={"service": rule.service, "src": f"{client_ip}:{client_port}"},
            )
            _reset(writer)
            return
        try:
            up_reader, up_writer, local = await self._connect(endpoint, client_ip, client_port)
        except OSError as exc:
            REJECTED.labels(rule.namespace, rule.name, "endpoint-unreachable").inc()
            log.warning(
                "endpoint unreachable",
                extra={"service": rule.service, "endpoint": endpoint.address, "error": str(exc)},
            )
            _reset(writer)
            return
        conn = ConnInfo(
            id=next(self._ids),
            rule=rule,
            endpoint=endpoint,
            selector=self.selector,
            original_src=f"{client_ip}:{client_port}",
            original_dst=f"{vip}:{port}",
            translated_src=f"{local[0]}:{local[1]}",
            translated_dst=endpoint.address,
            node=addresses.node_for_ip(client_ip) or "node-a",
            opened=time.time(),
        )
        self.conntrack[conn.id] = conn
        CONNECTIONS.labels(rule.namespace, rule.name, endpoint.pod).inc()
        ACTIVE.labels(rule.namespace, rule.name).inc()
        try:
            await self._relay(conn, (reader, writer), (up_reader, up_writer))
        finally:
            ACTIVE.labels(rule.namespace, rule.name).dec()
            for direction, n in (("in", conn.bytes_in), ("out", conn.bytes_out)):
                BYTES.labels(rule.namespace, rule.name, endpoint.pod, direction).inc(n)
            conn.closed, conn.state = time.time(), "TIME_WAIT"
            self.conntrack.pop(conn.id, None)
            self.closed.append(conn)
            for w in (writer, up_writer):
                w.close()

    async def _connect(
        self, endpoint: EndpointTarget, client_ip: str, client_port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[str, int]]:
        """Open the DNATed leg from the client's own address (and port, when free)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((client_ip, client_port))
            except OSError:
                sock.bind((client_ip, 0))
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (endpoint.ip, endpoint.port)), 2.0)
        except (OSError, TimeoutError):
            sock.close()
            raise
        local = sock.getsockname()[:2]
        up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE * 4)
        return up_reader, up_writer, local

    async def _relay(
        self,
        conn: ConnInfo,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        try:
            first = await asyncio.wait_for(client[0].read(READ_SIZE), SNIFF_TIMEOUT)
        except TimeoutError:
            first = b""
        except (ConnectionError, OSError):
            return
        kind = sniff(first) if first else "tcp"
        if kind == "http1":
            await HTTP1Relay(self.tracer, conn, client, upstream).run(first)
        elif kind == "h2":
            await HTTP2Relay(self.tracer, conn, client, upstream).run(first)
        else:
            await relay_tcp(first, client, upstream, conn)

    # -- views -------------------------------------------------------------------------------

    def conntrack_entries(self) -> list[dict[str, Any]]:
        """Live and recently closed connections, like ``conntrack -L``."""
        now = time.time()
        out = []
        for conn in [*self.conntrack.values(), *self.closed]:
            osrc, odst = conn.original_src, conn.original_dst
            tsrc, tdst = conn.translated_src, conn.translated_dst
            out.append(
                {
                    "id": conn.id,
                    "protocol": "tcp",
                    "state": conn.state,
                    "original": {"src": osrc, "dst": odst},
                    "reply": {"src": tdst, "dst": tsrc},
                    "service": conn.rule.service,
                    "endpoint_pod": conn.endpoint.pod,
                    "dnat": odst != tdst,
                    "snat": osrc.rsplit(":", 1)[0] != tsrc.rsplit(":", 1)[0],
                    "l7": conn.protocol,
                    "requests": conn.requests,
                    "bytes": {"in": conn.bytes_in, "out": conn.bytes_out},
                    "age_seconds": round(now - conn.opened, 3),
                    "timeout_seconds": _remaining(conn, now),
                }
            )
        return out
