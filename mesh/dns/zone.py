"""The ``cluster.local`` zone computed from the cluster model, like CoreDNS's kubernetes plugin.

:func:`answer` takes a parsed query and the current :class:`ClusterState` and builds the
reply. It never raises on odd input. Records served:

* ``<svc>.<ns>.svc.cluster.local``  A: the ClusterIP, or one A per *ready* endpoint of a
  headless Service (NXDOMAIN when none is ready); CNAME for ExternalName Services
* ``<hostname>.<svc>.<ns>.svc.cluster.local`` A: StatefulSet pods behind a headless Service
* ``_<port>._<proto>.<svc>.<ns>.svc.cluster.local`` SRV for named ports, and SRV for every
  port on the bare ``<svc>.<ns>.svc.cluster.local`` (what CoreDNS answers there)
* ``a-b-c-d.<ns>.pod.cluster.local`` A, and PTR (``in-addr.arpa``) for ClusterIPs and pods
* names of the playground's "internet" (:data:`mesh.addresses.EXTERNAL_HOSTS`), answered as
  an upstream resolver would; any other name is NXDOMAIN, as on the public internet.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from mesh import addresses
from mesh.model.types import ClusterState, Service, ServicePort

ZONE = dns.name.from_text("cluster.local.")
REVERSE = dns.name.from_text("in-addr.arpa.")
DEFAULT_TTL = 5
"""Seconds; CoreDNS's kubernetes plugin default."""


@dataclass
class Records:
    """What a name has: addresses, an alias, service records, a reverse name."""

    a: list[str] = field(default_factory=list)
    cname: str | None = None
    srv: list[tuple[int, int, int, str]] = field(default_factory=list)
    """(priority, weight, port, target) — target fully qualified."""
    ptr: list[str] = field(default_factory=list)
    additional: dict[str, list[str]] = field(default_factory=dict)
    """Glue A records for SRV targets."""


def _labels(qname: dns.name.Name, origin: dns.name.Name) -> list[str]:
    rel = qname.relativize(origin)
    return [label.decode().lower() for label in rel.labels]


def _ready_endpoints(state: ClusterState, svc: Service) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for eps in state.slices_for(svc.namespace, svc.name):
        for ep in eps.endpoints:
            if ep.ready:
                out.extend((ip, ep.hostname) for ip in ep.addresses)
    return sorted(set(out))


def _endpoint_host(svc: Service, ip: str, hostname: str | None) -> str:
    label = hostname or ip.replace(".", "-")
    return f"{label}.{svc.name}.{svc.namespace}.svc.cluster.local."


def lookup(state: ClusterState, qname: dns.name.Name) -> Records | None:
    """The records of a name in the cluster zone; None means NXDOMAIN."""
    labels = _labels(qname, ZONE)
    if len(labels) >= 3 and labels[-1] == "svc":
        return _service_records(state, labels[:-1])
    if len(labels) == 3 and labels[2] == "pod":
        ip = labels[0].replace("-", ".")
        pod = state.pod_by_ip(ip)
        if pod is not None and pod.namespace == labels[1]:
            return Records(a=[ip])
    return None


def _service_records(state: ClusterState, labels: list[str]) -> Records | None:
    # labels without the trailing "svc": [..., <svc>, <ns>]
    if len(labels) == 2:
        svc = state.service(labels[1], labels[0])
        if svc is None:
            return None
        if svc.type == "ExternalName" and svc.external_name:
            return Records(cname=svc.external_name.rstrip(".") + ".")
        # SRV for the bare name: every port, as CoreDNS answers (its port and protocol
        # labels are then wildcards), next to the A records.
        srv = _srv_records(state, svc, svc.ports)
        if not svc.headless:
            return (
                Records(a=[svc.cluster_ip], srv=srv.srv, additional=srv.additional)
                if svc.cluster_ip
                else None
            )
        ready = _ready_endpoints(state, svc)
        if not ready:
            return None
        return Records(a=[ip for ip, _ in ready], srv=srv.srv, additional=srv.additional)
    if len(labels) == 3:
        svc = state.service(labels[2], labels[1])
        if svc is None or not svc.headless:
            return None
        for ip, hostname in _ready_endpoints(state, svc):
            if labels[0] in (hostname, ip.replace(".", "-")):
                return Records(a=[ip])
        return None
    if len(labels) == 4 and labels[0].startswith("_") and labels[1].startswith("_"):
        svc = state.service(labels[3], labels[2])
        if svc is None:
            return None
        port_name, proto = labels[0][1:], labels[1][1:].upper()
        port = next((p for p in svc.ports if p.name == port_name and p.protocol == proto), None)
        if port is None:
            return None
        records = _srv_records(state, svc, [port])
        return records if records.srv else None
    return None


def _srv_records(state: ClusterState, svc: Service, ports: list[ServicePort]) -> Records:
    """SRV records of ``ports``: the Service name and port for a ClusterIP Service, each ready
    endpoint's name and port for a headless one; glue A records for the targets. Weights
    split 100 between the records, as CoreDNS does (all have priority 0)."""
    found: list[tuple[int, str, str]] = []  # (port, target, ip)
    if not svc.headless:
        if svc.cluster_ip:
            target = f"{svc.name}.{svc.namespace}.svc.cluster.local."
            found = [(p.port, target, svc.cluster_ip) for p in ports]
    else:
        names = {p.name for p in ports}
        for eps in state.slices_for(svc.namespace, svc.name):
            ep_ports = [p.port for p in eps.ports if p.name in names and p.port]
            for ep in eps.endpoints:
                if ep.ready:
                    for ip in ep.addresses:
                        host = _endpoint_host(svc, ip, ep.hostname)
                        found.extend((ep_port, host, ip) for ep_port in ep_ports)
    found = sorted(set(found), key=lambda f: (f[1], f[0]))
    records = Records()
    for port, target, ip in found:
        records.srv.append((0, 100 // len(found), port, target))
        records.additional[target] = [ip]
    return records


def reverse_lookup(state: ClusterState, qname: dns.name.Name) -> Records | None:
    """PTR for ClusterIPs and pod IPs."""
    labels = _labels(qname, REVERSE)
    if len(labels) != 4:
        return None
    ip = ".".join(reversed(labels))
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return None
    for svc in state.services:
        if svc.cluster_ip == ip:
            return Records(ptr=[f"{svc.name}.{svc.namespace}.svc.cluster.local."])
    pod = state.pod_by_ip(ip)
    if pod is not None:
        if pod.hostname and pod.subdomain:
            return Records(
                ptr=[f"{pod.hostname}.{pod.subdomain}.{pod.namespace}.svc.cluster.local."]
            )
        return Records(ptr=[f"{ip.replace('.', '-')}.{pod.namespace}.pod.cluster.local."])
    return None


def external_lookup(qname: dns.name.Name) -> Records | None:
    """The playground's internet: a few public names at external addresses."""
    ip = addresses.EXTERNAL_HOSTS.get(qname.to_text().lower())
    return Records(a=[ip]) if ip else None


def answer(
    query: dns.message.Message, state: ClusterState, ttl: int = DEFAULT_TTL
) -> tuple[dns.message.Message, str]:
    """The reply to ``query`` and the zone label for metrics (``cluster.local.`` or ``.``)."""
    reply = dns.message.make_response(query)
    if len(query.question) != 1:
        reply.set_rcode(dns.rcode.FORMERR)
        return reply, "."
    question = query.question[0]
    qname, rdtype = question.name, question.rdtype
    if question.rdclass != dns.rdataclass.IN:
        reply.set_rcode(dns.rcode.NOTIMP)
        return reply, "."
    if qname.is_subdomain(ZONE):
        zone, records = str(ZONE), lookup(state, qname)
        reply.flags |= dns.flags.AA
    elif qname.is_subdomain(REVERSE):
        zone, records = str(REVERSE), reverse_lookup(state, qname)
        reply.flags |= dns.flags.AA
    else:
        zone, records = ".", external_lookup(qname)
        reply.flags |= dns.flags.RA
    if records is None:
        reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply, zone
    _fill(reply, qname, rdtype, records, ttl)
    return reply, zone


def _fill(
    reply: dns.message.Message, qname: dns.name.Name, rdtype: int, rec: Records, ttl: int
) -> None:
    any_type = rdtype == dns.rdatatype.ANY
    if rec.cname:
        reply.answer.append(dns.rrset.from_text_list(qname, ttl, "IN", "CNAME", [rec.cname]))
        target = external_lookup(dns.name.from_text(rec.cname))
        if target and rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            # The resolver chases the alias, as CoreDNS does through its upstream.
            target_name = dns.name.from_text(rec.cname)
            reply.answer.append(dns.rrset.from_text_list(target_name, ttl, "IN", "A", target.a))
        return
    if rec.a and (rdtype == dns.rdatatype.A or any_type):
        reply.answer.append(dns.rrset.from_text_list(qname, ttl, "IN", "A", rec.a))
    if rec.srv and (rdtype == dns.rdatatype.SRV or any_type):
        texts = [f"{p} {w} {port} {target}" for p, w, port, target in rec.srv]
        reply.answer.append(dns.rrset.from_text_list(qname, ttl, "IN", "SRV", texts))
        for host, ips in rec.additional.items():
            reply.additional.append(
                dns.rrset.from_text_list(dns.name.from_text(host), ttl, "IN", "A", ips)
            )
    if rec.ptr and (rdtype == dns.rdatatype.PTR or any_type):
        reply.answer.append(dns.rrset.from_text_list(qname, ttl, "IN", "PTR", rec.ptr))
