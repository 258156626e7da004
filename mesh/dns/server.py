"""Cluster DNS: the ``cluster.local`` zone over real UDP and TCP, as CoreDNS serves it.

:class:`DNSServer` answers from :mod:`mesh.dns.zone` for the latest cluster state, drops
queries the asking pod's egress NetworkPolicy does not allow, and counts requests under
CoreDNS's metric names (:class:`DnsMetrics`). A malformed packet gets FORMERR (or is dropped
when not even the header parses) and never stops the server. :func:`serve` listens on UDP
and TCP; :func:`main` is the process ``python -m mesh.dns`` runs.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

from mesh import addresses
from mesh.cni.streams import connection_handler
from mesh.dns.zone import answer
from mesh.model.policy import PolicyEngine, Verdict
from mesh.model.types import ClusterState, Container, ContainerPort, Pod
from mesh.model.watch import StateWatcher
from telemetry.logs import setup_json_logging

log = logging.getLogger("cluster-dns")


DURATION_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256)
"""Seconds, from 0.25 ms up: an answer from the in-memory zone takes well under 1 ms."""


class DnsMetrics:
    """CoreDNS's request metrics (same names and labels) and hopscope's own drop counts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "coredns_dns_requests",
            "Counter of DNS requests made per zone, protocol and family.",
            ["server", "zone", "proto", "family", "type"],
            registry=registry,
        )
        self.responses = Counter(
            "coredns_dns_responses",
            "Counter of response status codes.",
            ["server", "zone", "rcode"],
            registry=registry,
        )
        self.duration = Histogram(
            "coredns_dns_request_duration_seconds",
            "Histogram of the time (in seconds) each request took.",
            ["server", "zone", "type"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.policy_dropped = Counter(
            "hopscope_dns_policy_dropped_queries",
            "Queries dropped because the asking pod's egress NetworkPolicy does not allow DNS",
            ["namespace", "pod", "proto"],
            registry=registry,
        )
        self.malformed = Counter(
            "hopscope_dns_malformed_queries",
            "Queries that could not be parsed.",
            ["proto"],
            registry=registry,
        )


class DNSServer:
    """Answers queries to ``ip:port`` from the latest cluster state.

    ``ttl`` is the answers' TTL unless the state's DNS settings (the coredns ConfigMap) set
    one; ``metrics`` default to a registry of the server's own (tests).

    A reply is built once per distinct query and cluster state, then sent again with the
    next asker's ID in front (CoreDNS's cache plugin does the same for its TTL); every query
    is still checked against NetworkPolicy, counted and timed. A new state empties the cache.
    """

    def __init__(self, ip: str, port: int, ttl: int, metrics: DnsMetrics | None = None) -> None:
        self.ip, self.port, self.ttl = ip, port, ttl
        self.metrics = metrics or DnsMetrics(CollectorRegistry())
        self.server_label = f"dns://{ip}:{port}"
        self.state = ClusterState()
        self.policy = PolicyEngine(self.state)
        self._answers: dict[tuple[str, bytes], _Cached] = {}
        """Replies by protocol and query bytes after the ID, for the current state."""
        self._verdicts: dict[tuple[str, str], Verdict] = {}
        """Egress verdicts by client address and protocol, for the current state."""
        self._lock = threading.Lock()
        self._generation = 0

    def set_state(self, state: ClusterState) -> None:
        policy = PolicyEngine(state)
        # The server stands for the CoreDNS pods: policies select them by these labels.
        policy.pods_by_ip[self.ip] = COREDNS_POD
        with self._lock:  # queries are answered on another thread: no stale reply is kept
            self.state, self.policy = state, policy
            self._generation += 1
            self._answers.clear()
            self._verdicts.clear()

    def allowed(self, client_ip: str, proto: str) -> bool:
        """Egress NetworkPolicy of the asking pod, towards the CoreDNS pod on port 53."""
        verdict = self._verdicts.get((client_ip, proto))
        if verdict is None:
            generation, policy = self._generation, self.policy
            verdict = policy.check(client_ip, self.ip, 53, proto.upper())
            with self._lock:
                if generation == self._generation:
                    self._verdicts[(client_ip, proto)] = verdict
        if verdict.allowed:
            return True
        pod = self.policy.pods_by_ip.get(client_ip)
        self.metrics.policy_dropped.labels(
            pod.namespace if pod else "", pod.name if pod else client_ip, proto
        ).inc()
        log.warning(
            "query dropped by NetworkPolicy",
            extra={"client": client_ip, "proto": proto, "reason": verdict.reason},
        )
        return False

    def handle(self, wire: bytes, proto: str, client_ip: str | None = None) -> bytes | None:
        if client_ip is not None and not self.allowed(client_ip, proto):
            return None  # dropped, like a packet: the client times out and retries
        start = time.perf_counter()
        generation = self._generation
        cached = self._answers.get((proto, wire[2:]))
        if cached is not None:
            self._count(proto, cached.zone, cached.qtype, cached.rcode, start)
            return wire[:2] + cached.tail
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, IndexError, struct.error):
            self.metrics.malformed.labels(proto).inc()
            return _formerr(wire)
        if query.opcode() != dns.opcode.QUERY:
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.NOTIMP)
            return reply.to_wire()
        ttl = self.state.dns.ttl if self.state.dns.ttl is not None else self.ttl
        reply, zone = answer(query, self.state, ttl)
        qtype = dns.rdatatype.to_text(query.question[0].rdtype) if query.question else "other"
        rcode = dns.rcode.to_text(reply.rcode())
        self._count(proto, zone, qtype, rcode, start)
        name = query.question[0].name.to_text() if query.question else ""
        log.debug("query", extra={"qname": name, "type": qtype, "rcode": rcode, "proto": proto})
        max_size = 65535 if proto == "tcp" else max(512, query.payload if query.edns >= 0 else 512)
        try:
            out = reply.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            reply.answer.clear()
            reply.flags |= dns.flags.TC
            out = reply.to_wire()
        with self._lock:
            if generation == self._generation:  # else the state changed while answering
                if len(self._answers) >= ANSWER_CACHE_SIZE:
                    self._answers.clear()
                self._answers[(proto, wire[2:])] = _Cached(out[2:], zone, qtype, rcode)
        return out

    def _count(self, proto: str, zone: str, qtype: str, rcode: str, start: float) -> None:
        self.metrics.requests.labels(self.server_label, zone, proto, "1", qtype).inc()
        self.metrics.responses.labels(self.server_label, zone, rcode).inc()
        self.metrics.duration.labels(self.server_label, zone, qtype).observe(
            time.perf_counter() - start
        )


ANSWER_CACHE_SIZE = 4096
"""Distinct queries whose replies are kept until the cluster state changes."""


@dataclass(frozen=True)
class _Cached:
    """A reply as sent, without its ID (the next asker's ID goes in front)."""

    tail: bytes
    zone: str
    qtype: str
    rcode: str


COREDNS_POD = Pod(
    "coredns",
    "kube-system",
    {"k8s-app": "kube-dns"},
    "node-a",
    addresses.DNS_SERVICE_IP,
    [
        Container(
            "coredns",
            "coredns",
            ports=[ContainerPort(53, "dns", "UDP"), ContainerPort(53, "dns-tcp")],
        )
    ],
    phase="Running",
)
"""What NetworkPolicies see as the DNS server (port 53 in policy terms, as in a cluster)."""


def _formerr(wire: bytes) -> bytes | None:
    """A FORMERR reply echoing the query id, or None if there is no header to answer."""
    if len(wire) < 12:
        return None
    qid = struct.unpack("!H", wire[:2])[0]
    flags = 0x8000 | dns.rcode.FORMERR  # QR set, opcode QUERY
    return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = self.server.handle(data, "udp", addr[0])
        except Exception:
            log.exception("query failed", extra={"client": addr[0]})
            reply = _formerr(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


@connection_handler
async def _tcp_client(
    server: DNSServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    peer = writer.get_extra_info("peername")
    if not peer:  # reset before we got to it
        writer.close()
        return
    client_ip = str(peer[0])
    try:
        while True:
            header = await asyncio.wait_for(reader.readexactly(2), timeout=10)
            (length,) = struct.unpack("!H", header)
            wire = await reader.readexactly(length)
            try:
                reply = server.handle(wire, "tcp", client_ip)
            except Exception:
                log.exception("query failed")
                reply = _formerr(wire)
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def serve(server: DNSServer) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: _UDP(server), local_addr=(server.ip, server.port))
    tcp = await asyncio.start_server(lambda r, w: _tcp_client(server, r, w), server.ip, server.port)
    log.info("serving", extra={"listen": f"{server.ip}:{server.port}", "proto": "udp+tcp"})
    async with tcp:
        await tcp.serve_forever()


@dataclass(frozen=True)
class DnsSettings:
    """What ``python -m mesh.dns`` was asked to do."""

    api: str
    """Control-plane API URL to watch."""
    listen: str
    port: int
    ttl: int
    metrics_address: str
    metrics_port: int


def main(settings: DnsSettings, registry: CollectorRegistry = REGISTRY) -> None:
    """Serve DNS in this process, metrics of ``registry`` on the metrics port."""
    setup_json_logging({"component": "cluster-dns"})
    server = DNSServer(settings.listen, settings.port, settings.ttl, DnsMetrics(registry))
    watcher = StateWatcher(settings.api, server.set_state)
    watcher.start()
    start_http_server(settings.metrics_port, addr=settings.metrics_address, registry=registry)
    asyncio.run(serve(server))
