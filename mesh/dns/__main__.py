"""Cluster DNS: ``python -m mesh.dns --api URL`` serves ``cluster.local`` over UDP and TCP.

It watches the control plane for the cluster state, answers from :mod:`mesh.dns.zone`, and
exports CoreDNS-named Prometheus metrics. A malformed packet gets FORMERR (or is dropped when
not even the header parses) and never stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct
import time

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
from prometheus_client import Counter, Histogram, start_http_server

from mesh import addresses
from mesh.cni.streams import connection_handler
from mesh.dns.zone import DEFAULT_TTL, answer
from mesh.model.policy import PolicyEngine
from mesh.model.types import ClusterState, Container, ContainerPort, Pod
from mesh.model.watch import StateWatcher
from telemetry.logs import setup_json_logging

log = logging.getLogger("cluster-dns")

REQUESTS = Counter(
    "coredns_dns_requests",
    "Counter of DNS requests made per zone, protocol and family.",
    ["server", "zone", "proto", "family", "type"],
)
RESPONSES = Counter(
    "coredns_dns_responses",
    "Counter of response status codes.",
    ["server", "zone", "rcode"],
)
DURATION = Histogram(
    "coredns_dns_request_duration_seconds",
    "Histogram of the time (in seconds) each request took.",
    ["server", "zone", "type"],
    buckets=(0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256),
)
POLICY_DROPPED = Counter(
    "hopscope_dns_policy_dropped_queries",
    "Queries dropped because the asking pod's egress NetworkPolicy does not allow DNS",
    ["namespace", "pod", "proto"],
)
MALFORMED = Counter(
    "hopscope_dns_malformed_queries", "Queries that could not be parsed.", ["proto"]
)


class DNSServer:
    def __init__(self, ip: str, port: int, ttl: int) -> None:
        self.ip, self.port, self.ttl = ip, port, ttl
        self.server_label = f"dns://{ip}:{port}"
        self.state = ClusterState()
        self.policy = PolicyEngine(self.state)

    def set_state(self, state: ClusterState) -> None:
        self.state = state
        self.policy = PolicyEngine(state)
        # The server stands for the CoreDNS pods: policies select them by these labels.
        self.policy.pods_by_ip[self.ip] = COREDNS_POD

    def allowed(self, client_ip: str, proto: str) -> bool:
        """Egress NetworkPolicy of the asking pod, towards the CoreDNS pod on port 53."""
        verdict = self.policy.check(client_ip, self.ip, 53, proto.upper())
        if verdict.allowed:
            return True
        pod = self.policy.pods_by_ip.get(client_ip)
        POLICY_DROPPED.labels(
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
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, IndexError, struct.error):
            MALFORMED.labels(proto).inc()
            return _formerr(wire)
        if query.opcode() != dns.opcode.QUERY:
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.NOTIMP)
            return reply.to_wire()
        ttl = self.state.dns.ttl if self.state.dns.ttl is not None else self.ttl
        reply, zone = answer(query, self.state, ttl)
        qtype = dns.rdatatype.to_text(query.question[0].rdtype) if query.question else "other"
        rcode = dns.rcode.to_text(reply.rcode())
        REQUESTS.labels(self.server_label, zone, proto, "1", qtype).inc()
        RESPONSES.labels(self.server_label, zone, rcode).inc()
        DURATION.labels(self.server_label, zone, qtype).observe(time.perf_counter() - start)
        name = query.question[0].name.to_text() if query.question else ""
        log.debug("query", extra={"qname": name, "type": qtype, "rcode": rcode, "proto": proto})
        max_size = 65535 if proto == "tcp" else max(512, query.payload if query.edns >= 0 else 512)
        try:
            return reply.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            reply.answer.clear()
            reply.flags |= dns.flags.TC
            return reply.to_wire()


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mesh.dns", description=__doc__)
    parser.add_argument("--api", required=True, help="control-plane API URL")
    parser.add_argument("--listen", default=addresses.DNS_SERVICE_IP)
    parser.add_argument("--port", type=int, default=addresses.DNS_PORT)
    parser.add_argument("--metrics-port", type=int, default=addresses.DNS_METRICS_PORT)
    parser.add_argument("--metrics-address", default=addresses.DNS_METRICS_IP)
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="answer TTL in seconds")
    args = parser.parse_args(argv)
    setup_json_logging({"component": "cluster-dns"})
    server = DNSServer(args.listen, args.port, args.ttl)
    watcher = StateWatcher(args.api, server.set_state)
    watcher.start()
    start_http_server(args.metrics_port, addr=args.metrics_address)
    asyncio.run(serve(server))


if __name__ == "__main__":
    main()
