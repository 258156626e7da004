"""The ``cluster.local`` zone computed from the cluster model, like CoreDNS's kubernetes plugin.

:func:`answer` takes a parsed query and the current :class:`ClusterState` and builds the
reply. It never raises on odd input: names outside the zone get REFUSED (there is no
upstream resolver in the playground), unknown names inside it NXDOMAIN.
"""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from mesh.model.types import ClusterState

ZONE = dns.name.from_text("cluster.local.")
DEFAULT_TTL = 5
"""Seconds; CoreDNS's kubernetes plugin default."""


def _labels(qname: dns.name.Name) -> list[str]:
    rel = qname.relativize(ZONE)
    return [label.decode().lower() for label in rel.labels]


def service_addresses(state: ClusterState, namespace: str, name: str) -> list[str] | None:
    """A records of a Service: its ClusterIP, or ready endpoints if headless; None if absent."""
    svc = state.service(namespace, name)
    if svc is None:
        return None
    if svc.type == "ExternalName":
        return []
    if not svc.headless:
        return [svc.cluster_ip] if svc.cluster_ip else []
    ips = []
    for eps in state.slices_for(namespace, name):
        for ep in eps.endpoints:
            if ep.ready:
                ips.extend(ep.addresses)
    return sorted(set(ips))


def lookup_a(state: ClusterState, qname: dns.name.Name) -> list[str] | None:
    """Addresses for a name in the zone; None means NXDOMAIN."""
    labels = _labels(qname)
    # <svc>.<ns>.svc
    if len(labels) == 3 and labels[2] == "svc":
        ips = service_addresses(state, labels[1], labels[0])
        return ips if ips else None
    # <hostname>.<svc>.<ns>.svc (StatefulSet pods behind a headless Service)
    if len(labels) == 4 and labels[3] == "svc":
        host, svc, ns = labels[0], labels[1], labels[2]
        for eps in state.slices_for(ns, svc):
            for ep in eps.endpoints:
                if ep.hostname == host and ep.addresses:
                    return ep.addresses[:1]
        return None
    # a-b-c-d.<ns>.pod
    if len(labels) == 3 and labels[2] == "pod":
        ip = labels[0].replace("-", ".")
        pod = state.pod_by_ip(ip)
        if pod is not None and pod.namespace == labels[1]:
            return [ip]
        return None
    return None


def answer(
    query: dns.message.Message, state: ClusterState, ttl: int = DEFAULT_TTL
) -> tuple[dns.message.Message, str]:
    """The reply to ``query`` and the zone label for metrics (``cluster.local.`` or ``.``)."""
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.AA
    if len(query.question) != 1:
        reply.set_rcode(dns.rcode.FORMERR)
        return reply, "."
    question = query.question[0]
    qname, rdtype = question.name, question.rdtype
    if not qname.is_subdomain(ZONE):
        reply.flags &= ~dns.flags.AA
        reply.set_rcode(dns.rcode.REFUSED)
        return reply, "."
    if question.rdclass != dns.rdataclass.IN:
        reply.set_rcode(dns.rcode.NOTIMP)
        return reply, str(ZONE)
    ips = lookup_a(state, qname)
    if ips is None:
        reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply, str(ZONE)
    if rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        reply.answer.append(dns.rrset.from_text_list(qname, ttl, "IN", "A", ips))
    return reply, str(ZONE)
