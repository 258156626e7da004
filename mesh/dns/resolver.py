"""The pod's stub resolver: glibc's search-path walk against cluster DNS, as a ``dns`` hop.

:class:`PodResolver` asks cluster DNS over real UDP from the pod's own address, walking the
search path with ``ndots`` the way glibc does with a pod's ``/etc/resolv.conf``, and records
the lookup as the ``dns`` hop span (every query tried, their rcodes, the answer and TTL).
The sample apps resolve with it, and so do ``hopscope curl --from POD`` and ``hopscope dig
--from POD``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.query
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

    def __init__(self, name: str, rcode: str, queries: list[str]) -> None:
        super().__init__(f"could not resolve {name!r}: {rcode} (tried {', '.join(queries)})")
        self.name = name
        self.rcode = rcode
        self.queries = queries


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


class PodResolver:
    """A stub resolver with a pod's resolv.conf: nameserver, search path, ndots."""

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

    def lookup(self, name: str, rdtype: str = "A") -> Lookup:
        """Walk the search path; return every query tried and the answer (maybe empty)."""
        result = Lookup(name)
        for qname in candidates(name, self.search, self.ndots):
            result.queries.append(qname)
            query = dns.message.make_query(qname, rdtype)
            query.flags |= dns.flags.RD
            try:
                reply = dns.query.udp(
                    query,
                    self.server[0],
                    port=self.server[1],
                    timeout=DNS_TIMEOUT,
                    source=self.source_ip,
                )
            except dns.exception.Timeout:
                result.rcodes.append("TIMEOUT")
                continue
            rcode = dns.rcode.to_text(reply.rcode())
            result.rcodes.append(rcode)
            if reply.rcode() != dns.rcode.NOERROR:
                continue
            wanted = dns.rdatatype.from_text(rdtype)
            for rrset in reply.answer:
                if rrset.rdtype == wanted:
                    result.answer.extend(r.to_text() for r in rrset)
                    result.ttl = rrset.ttl
            if result.answer:
                return result
        return result

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
                raise ResolveError(name, rcode, result.queries)
            return result.answer
