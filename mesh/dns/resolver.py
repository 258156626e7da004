"""The pod's stub resolver: glibc's search-path walk against cluster DNS, as a ``dns`` hop.

:class:`PodResolver` asks cluster DNS over real UDP from the pod's own address, walking the
search path with ``ndots`` the way glibc does with a pod's ``/etc/resolv.conf``, and records
the lookup as the ``dns`` hop span (every query tried, their rcodes, the answer and TTL).
The sample apps resolve with it, and so do ``hopscope curl --from POD`` and ``hopscope dig
--from POD``.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

DNS_PEER_SERVICE = "kube-dns"
"""``peer.service`` of the ``dns`` span: the cluster DNS Service's name."""

DNS_TIMEOUT = 2.0
"""Seconds to wait for one DNS answer over UDP (glibc's default is 5; we are on loopback)."""


class ResolveError(Exception):
    """A name did not resolve; ``rcode`` is the last answer's code (or ``TIMEOUT``)."""

    def __init__(
        self, name: str, rcode: str, queries: list[str], rcodes: list[str] | None = None
    ) -> None:
        rcodes = rcodes or []
        if len(rcodes) == len(queries) and len(set(rcodes)) > 1:  # each query's own answer
            tried = ", ".join(f"{q} {r}" for q, r in zip(queries, rcodes, strict=True))
            message = f"could not resolve {name!r}: {tried}"
        else:
            message = f"could not resolve {name!r}: {rcode} (tried {', '.join(queries)})"
        super().__init__(message)
        self.name = name
        self.rcode = rcode
        self.queries = queries
        self.rcodes = rcodes


@dataclass
class Lookup:
    name: str
    queries: list[str] = field(default_factory=list)
    rcodes: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    ttl: int | None = None


def candidates(name: str, search: list[str], ndots: int) -> list[str]:
    """The fully qualified names glibc tries, in order, for ``name``."""
    if name.endswith("."):
        return [name]
    absolute = name + "."
    with_search = [f"{name}.{domain.strip('.')}." for domain in search]
    if name.count(".") >= ndots:
        return [absolute, *with_search]
    return [*with_search, absolute]


@dataclass(frozen=True)
class _Answer:
    """What a lookup keeps of one reply."""

    rcode: str
    records: tuple[str, ...]
    ttl: int | None


REPLY_CACHE_SIZE = 512
"""Parsed replies kept per resolver, by their bytes (ID aside) — a parse cache, not a DNS
cache: every lookup still asks the server, as glibc does."""


class PodResolver:
    """A stub resolver with a pod's resolv.conf: nameserver, search path, ndots.

    Each lookup sends real queries over UDP from the pod's address. What costs CPU and not
    packets is kept: each query's wire form (only its ID changes), one socket per thread,
    and the parsed form of each distinct reply (an identical reply is not parsed again).
    """

    def __init__(
        self,
        server: tuple[str, int],
        search: list[str],
        ndots: int = 5,
        pod_name: str = "",
        namespace: str = "",
        source_ip: str | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.server = server
        self.search = search
        self.ndots = ndots
        self.pod_name = pod_name
        self.namespace = namespace
        self.source_ip = source_ip
        self.tracer = tracer or trace.get_tracer("hopscope.resolver")
        self._queries: dict[tuple[str, str], bytes] = {}
        self._replies: OrderedDict[tuple[bytes, bytes], _Answer] = OrderedDict()
        """Parsed replies by (query, reply) bytes after the ID."""
        self._lock = threading.Lock()
        self._local = threading.local()

    def lookup(self, name: str, rdtype: str = "A") -> Lookup:
        """Walk the search path; return every query tried and the answer (maybe empty)."""
        result = Lookup(name)
        for qname in candidates(name, self.search, self.ndots):
            result.queries.append(qname)
            try:
                answer = self._ask(qname, rdtype)
            except dns.exception.Timeout:
                result.rcodes.append("TIMEOUT")
                continue
            result.rcodes.append(answer.rcode)
            if answer.records:
                result.answer.extend(answer.records)
                result.ttl = answer.ttl
                return result
        return result

    def _ask(self, qname: str, rdtype: str) -> _Answer:
        """One query and its reply; raise ``dns.exception.Timeout``."""
        template = self._queries.get((qname, rdtype))
        if template is None:
            query = dns.message.make_query(qname, rdtype)
            query.flags |= dns.flags.RD
            template = query.to_wire()
            self._queries[(qname, rdtype)] = template
        qid = secrets.randbits(16)
        sock = self._socket()
        sock.sendto(qid.to_bytes(2, "big") + template[2:], self.server)
        deadline = time.monotonic() + DNS_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise dns.exception.Timeout
            sock.settimeout(remaining)
            try:
                wire, peer = sock.recvfrom(65535)
            except TimeoutError:
                raise dns.exception.Timeout from None
            # A late reply to an earlier query, or a stranger's packet: not ours.
            if peer[:2] == self.server and wire[:2] == qid.to_bytes(2, "big"):
                answer = self._parse(template, wire, rdtype)
                if answer is not None:
                    return answer

    def _parse(self, template: bytes, wire: bytes, rdtype: str) -> _Answer | None:
        key = (template[2:], wire[2:])
        with self._lock:
            cached = self._replies.get(key)
            if cached is not None:
                self._replies.move_to_end(key)
                return cached
        try:
            reply = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # garbage on our port: keep waiting for the real answer
        if (
            not reply.flags & dns.flags.QR
            or reply.question != dns.message.from_wire(template).question
        ):
            return None
        records: list[str] = []
        ttl: int | None = None
        if reply.rcode() == dns.rcode.NOERROR:
            wanted = dns.rdatatype.from_text(rdtype)
            for rrset in reply.answer:
                if rrset.rdtype == wanted:
                    records.extend(r.to_text() for r in rrset)
                    ttl = rrset.ttl
        answer = _Answer(dns.rcode.to_text(reply.rcode()), tuple(records), ttl)
        with self._lock:
            self._replies[key] = answer
            if len(self._replies) > REPLY_CACHE_SIZE:
                self._replies.popitem(last=False)
        return answer

    def _socket(self) -> socket.socket:
        sock: socket.socket | None = getattr(self._local, "socket", None)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if self.source_ip:
                sock.bind((self.source_ip, 0))
            self._local.socket = sock
        return sock

    def resolve(self, name: str) -> list[str]:
        """IPv4 addresses for ``name``, as a ``dns`` hop span; raise ResolveError.

        An address literal is used as is, without a lookup (as getaddrinfo does).
        """
        try:
            return [str(ipaddress.IPv4Address(name))]
        except ValueError:
            pass
        with self.tracer.start_as_current_span(f"dns A {name}", kind=SpanKind.CLIENT) as span:
            result = self.lookup(name)
            span.set_attributes(
                {
                    "hopscope.hop": "dns",
                    # Cluster DNS sends no spans: a service graph draws it as a virtual node.
                    "peer.service": DNS_PEER_SERVICE,
                    "dns.question.name": name,
                    "dns.question.type": "A",
                    "hopscope.dns.queries": result.queries,
                    "hopscope.dns.rcodes": result.rcodes,
                    "hopscope.dns.answer": result.answer,
                    "server.address": self.server[0],
                    "server.port": self.server[1],
                    "k8s.pod.name": self.pod_name,
                    "k8s.namespace.name": self.namespace,
                }
            )
            if self.source_ip:
                span.set_attribute("hopscope.pod.ip", self.source_ip)
            if result.ttl is not None:
                span.set_attribute("hopscope.dns.ttl", result.ttl)
            if not result.answer:
                rcode = result.rcodes[-1] if result.rcodes else "NOANSWER"
                span.set_status(Status(StatusCode.ERROR, rcode))
                raise ResolveError(name, rcode, result.queries, result.rcodes)
            return result.answer
