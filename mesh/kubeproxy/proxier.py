"""The proxier: listeners on every Service VIP:port, the DNAT decision, the conntrack table.

State arrives from the watch (another thread) and is coalesced into one ``sync()`` on the
event loop, as kube-proxy's ``BoundedFrequencyRunner`` does: the rule set is rebuilt from the
whole state, listeners are opened/closed to match, and the new rules replace the old in one
assignment, so a connection always sees one consistent rule set.

A new connection is "DNATed" at accept time, before any byte is read — like the first SYN
hitting the nat table: the endpoint is chosen among *ready* endpoints, and the upstream
socket is bound to the client's own address (ClusterIP traffic keeps its source; DNAT only).
A Service port with no ready endpoint has no listener at all, so ``connect()`` fails at once
with "connection refused" — what kube-proxy's REJECT rule gives a client. The listener comes
back with the first ready endpoint; a connection accepted just before the last endpoint went
away is still reset, with a REJECT span in the caller's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram

from mesh import addresses
from mesh.cni.streams import connection_handler, endpoints
from mesh.cni.vtep import OverlayError, OverlaySettings, TunnelInfo, open_tunnel
from mesh.datapath_metrics import KubeProxyMetrics
from mesh.kubeproxy.hop import ConnInfo, deny_span, refusal_span
from mesh.kubeproxy.relays import READ_SIZE, HTTP1Relay, HTTP2Relay, relay_tcp, sniff
from mesh.kubeproxy.rules import (
    EndpointTarget,
    HealthCheck,
    RuleSet,
    Selector,
    ServiceRule,
    build_rules,
    decide,
    hairpin_snat,
    health_check_reply,
    make_selector,
)
from mesh.kubeproxy.tlsconn import relay_tls
from mesh.model.policy import PolicyEngine, Verdict
from mesh.model.types import ClusterState, NetworkConfig
from mesh.netutil import open_from, reset
from mesh.policy_metrics import PolicyEnforcementMetrics

log = logging.getLogger("kube-proxy")

REJECT_READ_TIMEOUT = 0.25
"""Seconds a refused connection waits for the request's headers (to join its trace)."""

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
_METRICS = KubeProxyMetrics.build()
RULES, REJECTING, CONNECTIONS = _METRICS.rules, _METRICS.rejecting, _METRICS.connections
ACTIVE, BYTES, REJECTED = _METRICS.active, _METRICS.bytes, _METRICS.rejected


def _remaining(conn: ConnInfo, now: float) -> int:
    """Seconds left on the entry: 5 days while open (ESTABLISHED), 120 s after close."""
    if conn.closed is None:
        return ESTABLISHED_TIMEOUT
    return max(0, TIME_WAIT_TIMEOUT - round(now - conn.closed))


class Proxier:
    def __init__(
        self,
        tracer: Any,
        selector: Selector | None = None,
        min_sync_period: float = 0.0,
        node_ips: dict[str, str] | None = None,
        telemetry: bool = True,
        overlay: bool = True,
        policy_metrics: PolicyEnforcementMetrics | None = None,
    ) -> None:
        self.tracer = tracer
        self.policy_metrics = policy_metrics or PolicyEnforcementMetrics(CollectorRegistry())
        self.overlay = overlay
        """Route cross-node connections through the nodes' VTEPs (the CNI emulator)."""
        self.network = NetworkConfig()
        self.policy = PolicyEngine(ClusterState())
        self.telemetry = telemetry
        """Per-request hop spans (HTTP parsing); off, connections are spliced as TCP."""
        self.fixed_selector = selector is not None
        self.active: dict[str, int] = {}
        """Open connections per endpoint address (ipvs ``lc`` reads it)."""
        self.selector = selector or make_selector(RuleSet().proxy, self._active)
        self.min_sync_period = min_sync_period
        self.node_ips = node_ips or dict(addresses.NODE_IPS)
        self.affinity: dict[tuple[str, str, str | None, str], tuple[str, float]] = {}
        self.health_listeners: dict[tuple[str, int], asyncio.Server] = {}
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
        self._rejecting_labels: set[tuple[str, str, str]] = set()
        self.paused = False

    # -- sync ------------------------------------------------------------------------------

    def on_state(self, state: ClusterState) -> None:
        """Called from the watch thread with each new state."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._state_arrived, state, time.monotonic())

    def set_paused(self, paused: bool) -> None:
        """Stop (or resume) applying new state — kube-proxy cut off from the API server.

        While paused the rules in force go stale: endpoints that changed keep receiving
        traffic. Called from the admin thread.
        """
        self.paused = paused
        log.warning("rule sync paused" if paused else "rule sync resumed")
        if not paused and self.loop is not None and self._pending is not None:
            self.loop.call_soon_threadsafe(self._state_arrived, *self._pending)

    def _state_arrived(self, state: ClusterState, received: float) -> None:
        self._pending = (state, received)
        if self.paused:
            return
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.ensure_future(self._sync_soon())

    async def _sync_soon(self) -> None:
        wait = self.min_sync_period - (time.monotonic() - self._last_sync)
        if wait > 0:
            await asyncio.sleep(wait)
        while self._pending is not None and not self.paused:
            state, received = self._pending
            self._pending = None
            await self.sync(state)
            NETWORK_PROGRAMMING.observe(time.monotonic() - received)

    def _active(self, address: str) -> int:
        return self.active.get(address, 0)

    async def sync(self, state: ClusterState) -> None:
        start = time.perf_counter()
        new = build_rules(state, self.node_ips)
        if not self.fixed_selector and new.proxy != self.rules.proxy:
            self.selector = make_selector(new.proxy, self._active)
            self.min_sync_period = new.proxy.min_sync_period
        # A rule without a ready endpoint is a REJECT: no listener, so connect() is refused.
        serving = {k: r for k, r in new.rules.items() if r.ready_endpoints}
        for key in [k for k in self.listeners if k not in serving]:
            self.listeners.pop(key).close()
        for key, rule in serving.items():
            if key not in self.listeners:
                await self._listen(rule)
        self._count_rejecting(new)
        for key in [k for k in self.health_listeners if k not in new.health_checks]:
            self.health_listeners.pop(key).close()
        for key in new.health_checks:
            if key not in self.health_listeners:
                await self._listen_health(key)
        self.rules = new
        self.network = state.network
        self.policy = PolicyEngine(state)
        for conn in self.conntrack.values():  # the VTEPs apply a new delay to live tunnels too
            conn.overlay_delay_ms = state.network.overlay_delay_ms
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

    def _count_rejecting(self, rules: RuleSet) -> None:
        counts: dict[tuple[str, str, str], int] = {}
        for rule in rules.rules.values():
            key = (rule.namespace, rule.name, rule.kind)
            counts[key] = counts.get(key, 0) + (0 if rule.ready_endpoints else 1)
        for labels, count in counts.items():
            REJECTING.labels(*labels).set(count)
            if count:
                # The kernel refuses these connections now, uncounted; the series exists
                # (at its last value) so panels on rejections are not blank.
                REJECTED.labels(labels[0], labels[1], "no-ready-endpoints")
        for gone in self._rejecting_labels - counts.keys():
            REJECTING.remove(*gone)
        self._rejecting_labels = set(counts)

    def rejecting(self) -> list[str]:
        """``VIP:port (ns/name)`` of every Service address refusing connections."""
        return sorted(
            f"{r.vip}:{r.port} ({r.namespace}/{r.name})"
            for r in self.rules.rules.values()
            if not r.ready_endpoints
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

    async def _listen_health(self, key: tuple[str, int]) -> None:
        try:
            server = await asyncio.start_server(self._health, key[0], key[1], reuse_address=True)
        except OSError as exc:
            self.bind_errors[f"{key[0]}:{key[1]}"] = str(exc)
            return
        self.health_listeners[key] = server

    @connection_handler
    async def _health(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``healthCheckNodePort``: 200 with the local endpoint count, 503 when there are none."""
        ends = endpoints(writer)
        if ends is None:  # reset before we got to it
            writer.close()
            return
        key = ends[0]
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        check: HealthCheck | None = self.rules.health_checks.get(key)  # type: ignore[arg-type]
        code, body = health_check_reply(check)
        status = {200: "200 OK", 503: "503 Service Unavailable"}.get(code, "404 Not Found")
        data = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + data)
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    # -- connections -------------------------------------------------------------------------

    @connection_handler
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted_at, accepted_ns = time.perf_counter(), time.time_ns()
        ends = endpoints(writer)
        if ends is None:  # the client reset before we got to it: nothing left to NAT
            writer.close()
            return
        (vip, port), (client_ip, client_port) = ends
        rule = self.rules.rules.get((vip, port))
        if rule is None:
            REJECTED.labels("", "", "no-service").inc()
            reset(writer)
            return
        decision = decide(rule, client_ip, self.node_ips)
        endpoint, affinity = self._choose(rule, decision.candidates, client_ip)
        if endpoint is None:
            reason = "no-ready-endpoints" if not rule.ready_endpoints else "no-local-endpoints"
            REJECTED.labels(rule.namespace, rule.name, reason).inc()
            if self.telemetry:
                words = reason.replace("-", " ")
                attrs = self._rule_attributes(rule, f"{client_ip}:{client_port}", f"{vip}:{port}")
                attrs.update({"error.type": reason, "hopscope.decision": decision.reason})
                await refusal_span(
                    self.tracer,
                    f"kube-proxy {rule.namespace}/{rule.name} REJECT ({words})",
                    attrs,
                    (
                        f"Service {rule.namespace}/{rule.name} has no ready endpoints"
                        if reason == "no-ready-endpoints"
                        else f"Service {rule.namespace}/{rule.name}: {decision.reason}"
                    ),
                    reader,
                    REJECT_READ_TIMEOUT,
                    message="rejected",
                )
            reset(writer)
            return
        snat = decision.snat_ip or hairpin_snat(endpoint, client_ip, self.node_ips)
        source = snat or client_ip
        verdict = self.policy.check(client_ip, endpoint.ip, endpoint.port, seen_src_ip=source)
        if not verdict.allowed:
            await self._deny(
                rule, endpoint, decision.reason, verdict, (reader, writer), source, ends
            )
            return
        src_node = addresses.node_for_ip(source) or rule.node or addresses.INGRESS_NODE
        try:
            up_reader, up_writer, local, tunnel = await self._connect(endpoint, source, src_node)
        except OSError as exc:
            REJECTED.labels(rule.namespace, rule.name, "endpoint-unreachable").inc()
            if self.telemetry:
                attrs = self._rule_attributes(rule, f"{client_ip}:{client_port}", f"{vip}:{port}")
                attrs.update(
                    {
                        "error.type": "endpoint-unreachable",
                        "hopscope.nat.translated.dst": endpoint.address,
                        "hopscope.endpoint.pod": endpoint.pod,
                        "hopscope.endpoint.node": endpoint.node,
                        "hopscope.decision": decision.reason,
                        "hopscope.rules.synced_at": self.synced_at or 0.0,
                    }
                )
                await refusal_span(
                    self.tracer,
                    f"kube-proxy {rule.namespace}/{rule.name} endpoint unreachable",
                    attrs,
                    f"DNAT to {endpoint.address} ({endpoint.pod}) failed: {exc}",
                    reader,
                    REJECT_READ_TIMEOUT,
                    message="endpoint unreachable",
                )
            reset(writer)
            return
        reason = decision.reason
        if snat and not decision.snat_ip:
            reason = "hairpin: the pod reached itself, masqueraded to its node IP"
        conn = self._conn_info(
            rule,
            endpoint,
            ends,
            f"{local[0]}:{local[1]}",
            reason,
            affinity=affinity,
            tunnel=tunnel,
            policy=verdict if verdict.policies else None,
            overlay_delay_ms=self.network.overlay_delay_ms,
            accepted_at=accepted_at,
            accepted_ns=accepted_ns,
        )
        self.conntrack[conn.id] = conn
        self.active[endpoint.address] = self.active.get(endpoint.address, 0) + 1
        CONNECTIONS.labels(rule.namespace, rule.name, endpoint.pod).inc()
        ACTIVE.labels(rule.namespace, rule.name).inc()
        try:
            await self._relay(conn, (reader, writer), (up_reader, up_writer))
        finally:
            ACTIVE.labels(rule.namespace, rule.name).dec()
            self.active[endpoint.address] -= 1
            for direction, n in (("in", conn.bytes_in), ("out", conn.bytes_out)):
                BYTES.labels(rule.namespace, rule.name, endpoint.pod, direction).inc(n)
            conn.closed, conn.state = time.time(), "TIME_WAIT"
            self.conntrack.pop(conn.id, None)
            self.closed.append(conn)
            for w in (writer, up_writer):
                w.close()

    def _rule_attributes(self, rule: ServiceRule, src: str, dst: str) -> dict[str, Any]:
        """Hop attributes of a connection refused before any endpoint took it."""
        return {
            "hopscope.hop": rule.hop,
            "k8s.service.name": rule.name,
            "k8s.namespace.name": rule.namespace,
            "k8s.node.name": rule.node or addresses.node_for_ip(src.rsplit(":", 1)[0]) or "",
            "hopscope.service.type": rule.service_type,
            "hopscope.service.port": rule.port,
            "hopscope.nat.original.src": src,
            "hopscope.nat.original.dst": dst,
            "hopscope.lb.mode": self.selector.mode,
            "hopscope.lb.algorithm": self.selector.algorithm,
            "hopscope.conntrack.state": "new",
            "hopscope.rule.kind": rule.kind,
            "network.peer.address": src.rsplit(":", 1)[0],
        }

    def _choose(
        self, rule: ServiceRule, candidates: tuple[EndpointTarget, ...], client_ip: str
    ) -> tuple[EndpointTarget | None, str]:
        """The selector's pick, or the client's sticky endpoint under ClientIP affinity."""
        if rule.session_affinity != "ClientIP" or rule.kind == "load-balancer":
            return self.selector.pick(rule, candidates, client_ip), ""
        key = (rule.namespace, rule.name, rule.port_name, client_ip)
        now = time.monotonic()
        sticky = self.affinity.get(key)
        if sticky is not None and sticky[1] > now:
            for candidate in candidates:
                if candidate.address == sticky[0]:
                    self.affinity[key] = (candidate.address, now + rule.affinity_timeout)
                    return candidate, "ClientIP (sticky)"
        endpoint = self.selector.pick(rule, candidates, client_ip)
        if endpoint is not None:
            self.affinity[key] = (endpoint.address, now + rule.affinity_timeout)
        return endpoint, "ClientIP (new)"

    async def _deny(
        self,
        rule: ServiceRule,
        endpoint: EndpointTarget,
        reason: str,
        verdict: Verdict,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        source: str,
        ends: tuple[tuple[str, int], tuple[str, int]],
    ) -> None:
        """NetworkPolicy said no: record it in the caller's trace, count it, reset."""
        reader, writer = client
        client_port = ends[1][1]
        self.policy_metrics.count_denied(rule.namespace, endpoint.pod, verdict)
        REJECTED.labels(rule.namespace, rule.name, "network-policy").inc()
        conn = self._conn_info(
            rule, endpoint, ends, f"{source}:{client_port}", reason, policy=verdict, state="DENIED"
        )
        conn.closed = time.time()
        self.closed.append(conn)
        if self.telemetry:
            await deny_span(self.tracer, conn, reader)
        else:
            log.info("denied by NetworkPolicy", extra={"reason": verdict.reason})
        reset(writer)

    def _conn_info(
        self,
        rule: ServiceRule,
        endpoint: EndpointTarget,
        ends: tuple[tuple[str, int], tuple[str, int]],
        translated_src: str,
        reason: str,
        **extra: Any,
    ) -> ConnInfo:
        """The conntrack entry of a connection to ``endpoint``, numbered and opened now."""
        (vip, port), (client_ip, client_port) = ends
        return ConnInfo(
            id=next(self._ids),
            rule=rule,
            endpoint=endpoint,
            selector=self.selector,
            original_src=f"{client_ip}:{client_port}",
            original_dst=f"{vip}:{port}",
            translated_src=translated_src,
            translated_dst=endpoint.address,
            node=rule.node or addresses.node_for_ip(client_ip) or addresses.INGRESS_NODE,
            reason=reason,
            opened=time.time(),
            **extra,
        )

    async def _connect(
        self, endpoint: EndpointTarget, client_ip: str, src_node: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[str, int], TunnelInfo | None]:
        """Open the DNATed leg from ``client_ip`` (the client's or the SNAT address).

        An endpoint on another node is reached through the source node's overlay tunnel
        endpoint when the CNI backend is vxlan (host-gw routes directly, no encapsulation).
        """
        dst_node = addresses.node_for_ip(endpoint.ip)
        if (
            self.overlay
            and self.network.backend == "vxlan"
            and dst_node is not None
            and endpoint.ip != addresses.NODE_IPS.get(dst_node)
            and dst_node != src_node
            and src_node in addresses.NODE_IPS
        ):
            settings = OverlaySettings(vni=self.network.vni, delay_ms=self.network.overlay_delay_ms)
            try:
                up_r, up_w, info = await open_tunnel(
                    settings, src_node, client_ip, endpoint.ip, endpoint.port
                )
            except OverlayError as exc:
                raise OSError(f"overlay: {exc}") from None
            host, _, port = info.inner_src.rpartition(":")
            return up_r, up_w, (host, int(port)), info
        up_reader, up_writer, local = await open_from(
            endpoint.ip, endpoint.port, client_ip, 2.0, READ_SIZE * 4
        )
        return up_reader, up_writer, local, None

    async def _relay(
        self,
        conn: ConnInfo,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        waiting = time.perf_counter()
        try:
            async with asyncio.timeout(SNIFF_TIMEOUT):
                first = await client[0].read(READ_SIZE)
            conn.client_wait = time.perf_counter() - waiting
        except TimeoutError:
            first = b""
        except (ConnectionError, OSError):
            return
        kind = sniff(first) if first and self.telemetry else "tcp"
        if kind == "http1":
            await HTTP1Relay(self.tracer, conn, client, upstream).run(first)
        elif kind == "h2":
            await HTTP2Relay(self.tracer, conn, client, upstream).run(first)
        elif kind == "tls":
            await relay_tls(self.tracer, first, client, upstream, conn)
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
                    "overlay": (
                        {
                            "vni": conn.tunnel.vni,
                            "outer": {"src": conn.tunnel.outer_src, "dst": conn.tunnel.outer_dst},
                        }
                        if conn.tunnel
                        else None
                    ),
                    "policy": conn.policy.word if conn.policy else None,
                    "requests": conn.requests,
                    "bytes": {"in": conn.bytes_in, "out": conn.bytes_out},
                    "age_seconds": round(now - conn.opened, 3),
                    "timeout_seconds": _remaining(conn, now),
                }
            )
        return out
