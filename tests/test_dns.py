"""Cluster DNS answers from the model, over real UDP, and survives garbage."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client import CollectorRegistry

from mesh.dns.resolver import PodResolver, ResolveError, candidates
from mesh.dns.server import DnsMetrics, DNSServer, serve
from mesh.model.controllers import Cluster
from mesh.model.manifests import default_manifest_paths, load_manifests

DNS_IP, DNS_PORT = "127.96.250.10", 10153
SEARCH = ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"]


@pytest.fixture(scope="module")
def server() -> Iterator[DNSServer]:
    cluster = Cluster()
    cluster.apply(load_manifests(default_manifest_paths()))
    srv = DNSServer(DNS_IP, DNS_PORT, ttl=5)
    srv.set_state(cluster.state)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_until_complete, args=(serve(srv),), daemon=True).start()
    # answering on UDP before any test sends there: a query sent before the socket is bound
    # is lost, and a resolver would walk on down its search list
    deadline = time.monotonic() + 10
    probe = dns.message.make_query("kubernetes.default.svc.cluster.local.", "A")
    while True:
        try:
            dns.query.udp(probe, DNS_IP, port=DNS_PORT, timeout=0.2)
            break
        except (dns.exception.Timeout, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield srv


def _ask(server: DNSServer, name: str, rdtype: str = "A") -> dns.message.Message:
    wire = server.handle(dns.message.make_query(name, rdtype).to_wire(), "udp")
    assert wire is not None
    return dns.message.from_wire(wire)


def test_service_a_record_is_its_cluster_ip(server: DNSServer) -> None:
    reply = _ask(server, "Catalog.SHOP.svc.cluster.local.")  # case-insensitive
    assert reply.rcode() == dns.rcode.NOERROR
    (rrset,) = reply.answer
    assert rrset.ttl == 5
    assert [r.to_text() for r in rrset] == [server.state.service("shop", "catalog").cluster_ip]  # type: ignore[union-attr]


def test_unknown_names_are_nxdomain_inside_and_outside_the_zone(server: DNSServer) -> None:
    assert _ask(server, "nope.shop.svc.cluster.local.").rcode() == dns.rcode.NXDOMAIN
    assert _ask(server, "example.com.").rcode() == dns.rcode.NXDOMAIN
    reply = _ask(server, "payments.example.net.")
    assert [r.to_text() for r in reply.answer[0]] == ["127.50.0.10"]


def test_garbage_gets_formerr_or_nothing(server: DNSServer) -> None:
    reply = server.handle(b"\x12\x34" + b"\xff" * 20, "udp")
    assert reply is not None and reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR
    assert server.handle(b"\x01", "udp") is None
    assert _ask(server, "catalog.shop.svc.cluster.local.").rcode() == dns.rcode.NOERROR


def test_queries_are_counted_under_coredns_names_on_the_registry_given() -> None:
    registry = CollectorRegistry()
    srv = DNSServer(DNS_IP, DNS_PORT, ttl=5, metrics=DnsMetrics(registry))
    srv.handle(dns.message.make_query("nope.shop.svc.cluster.local.", "A").to_wire(), "udp")
    srv.handle(b"\x12\x34" + b"\xff" * 20, "tcp")
    server = f"dns://{DNS_IP}:{DNS_PORT}"
    zone = {"server": server, "zone": "cluster.local."}
    assert (
        registry.get_sample_value(
            "coredns_dns_requests_total", {**zone, "proto": "udp", "family": "1", "type": "A"}
        )
        == 1
    )
    assert (
        registry.get_sample_value("coredns_dns_responses_total", {**zone, "rcode": "NXDOMAIN"}) == 1
    )
    assert registry.get_sample_value("hopscope_dns_malformed_queries_total", {"proto": "tcp"}) == 1


def test_glibc_search_order_with_ndots_5() -> None:
    assert candidates("catalog", SEARCH, 5)[0] == "catalog.shop.svc.cluster.local."
    assert candidates("api.example.com", SEARCH, 5)[-1] == "api.example.com."
    assert candidates("a.b.c.d.e.f", SEARCH, 5)[0] == "a.b.c.d.e.f."
    assert candidates("fqdn.", SEARCH, 5) == ["fqdn."]


def test_pod_resolver_over_real_udp_records_every_query(server: DNSServer) -> None:
    resolver = PodResolver((DNS_IP, DNS_PORT), SEARCH, 5, "p", "shop", source_ip="127.244.1.9")
    lookup = resolver.lookup("reviews")
    assert lookup.queries == ["reviews.shop.svc.cluster.local."] and lookup.rcodes == ["NOERROR"]
    cross = resolver.lookup("catalog.shop")
    assert cross.rcodes == ["NXDOMAIN", "NOERROR"] and cross.answer
    with pytest.raises(ResolveError) as err:
        resolver.resolve("api.example.com")
    assert err.value.queries[-1] == "api.example.com."


def test_a_failed_lookup_names_each_querys_answer_when_they_differ() -> None:
    """A lost first query followed by NXDOMAINs is not an NXDOMAIN for the name."""
    mixed = ResolveError(
        "catalog", "NXDOMAIN", ["catalog.shop.", "catalog."], ["TIMEOUT", "NXDOMAIN"]
    )
    assert str(mixed) == "could not resolve 'catalog': catalog.shop. TIMEOUT, catalog. NXDOMAIN"
    same = ResolveError("x", "NXDOMAIN", ["x.a.", "x."], ["NXDOMAIN", "NXDOMAIN"])
    assert str(same) == "could not resolve 'x': NXDOMAIN (tried x.a., x.)"


EXTRA_IP, EXTRA_PORT = "127.96.250.11", 10154


@pytest.fixture(scope="module")
def rich() -> Iterator[tuple[Cluster, DNSServer]]:
    cluster = Cluster()
    cluster.apply(load_manifests(default_manifest_paths()))  # has the cache StatefulSet
    srv = DNSServer(EXTRA_IP, EXTRA_PORT, ttl=30)
    srv.set_state(cluster.state)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_until_complete, args=(serve(srv),), daemon=True).start()
    yield cluster, srv


def _udp(name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    import time

    import dns.exception
    import dns.query

    query = dns.message.make_query(name, rdtype)
    for _ in range(50):  # the server thread may still be binding
        try:
            if tcp:
                return dns.query.tcp(query, EXTRA_IP, port=EXTRA_PORT, timeout=0.5)
            return dns.query.udp(query, EXTRA_IP, port=EXTRA_PORT, timeout=0.5)
        except (ConnectionRefusedError, dns.exception.Timeout):
            time.sleep(0.05)
    raise AssertionError("DNS server did not start")


def _texts(reply: dns.message.Message) -> list[str]:
    return sorted(r.to_text() for rrset in reply.answer for r in rrset)


def test_headless_service_answers_ready_endpoints_only(rich: tuple[Cluster, DNSServer]) -> None:
    cluster, srv = rich
    assert _udp("cache.shop.svc.cluster.local.").rcode() == dns.rcode.NXDOMAIN  # none ready
    pods = [p for p in cluster.state.pods if p.owner_name == "cache"]
    for pod in pods:
        cluster.set_pod_running("shop", pod.name)
    cluster.set_pod_ready("shop", pods[0].name, True)
    srv.set_state(cluster.state)
    assert _texts(_udp("cache.shop.svc.cluster.local.")) == [pods[0].ip]
    # StatefulSet pods by their stable hostname behind the headless Service
    assert _texts(_udp(f"{pods[0].name}.cache.shop.svc.cluster.local.")) == [pods[0].ip]
    assert pods[0].name == "cache-0"
    srv_reply = _udp("_cache._tcp.cache.shop.svc.cluster.local.", "SRV")
    assert _texts(srv_reply) == ["0 100 6380 cache-0.cache.shop.svc.cluster.local."]
    assert [r.to_text() for r in srv_reply.additional[0]] == [pods[0].ip]
    # The bare name answers SRV too, one record per ready endpoint and port (CoreDNS).
    bare = _udp("cache.shop.svc.cluster.local.", "SRV")
    assert _texts(bare) == ["0 100 6380 cache-0.cache.shop.svc.cluster.local."]


def test_srv_for_a_cluster_ip_service_points_at_the_service(
    rich: tuple[Cluster, DNSServer],
) -> None:
    reply = _udp("_grpc._tcp.reviews.shop.svc.cluster.local.", "SRV")
    assert _texts(reply) == ["0 100 50051 reviews.shop.svc.cluster.local."]
    assert _udp("_nope._tcp.reviews.shop.svc.cluster.local.", "SRV").rcode() == dns.rcode.NXDOMAIN


def test_srv_for_a_bare_service_name_lists_every_port_like_coredns(
    rich: tuple[Cluster, DNSServer], tmp_path: Path
) -> None:
    """CoreDNS's kubernetes plugin treats missing port and protocol labels as wildcards:
    one SRV per Service port (named or not, any protocol), weights splitting 100."""
    reply = _udp("reviews.shop.svc.cluster.local.", "SRV")
    assert reply.rcode() == dns.rcode.NOERROR
    assert _texts(reply) == ["0 100 50051 reviews.shop.svc.cluster.local."]
    cluster, srv = rich
    manifest = tmp_path / "two-ports.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: two, namespace: shop}\n"
        "spec:\n  selector: {app: frontend}\n  ports:\n"
        "    - {name: http, port: 8080, targetPort: 8080}\n"
        "    - {name: dns, port: 53, targetPort: 53, protocol: UDP}\n"
    )
    cluster.apply(load_manifests([manifest]))
    srv.set_state(cluster.state)
    two = _udp("two.shop.svc.cluster.local.", "SRV")
    assert _texts(two) == [
        "0 50 53 two.shop.svc.cluster.local.",
        "0 50 8080 two.shop.svc.cluster.local.",
    ]
    vip = cluster.state.service("shop", "two")
    assert vip is not None
    assert [r.to_text() for r in two.additional[0]] == [vip.cluster_ip]  # glue A
    assert _texts(_udp("two.shop.svc.cluster.local.")) == [vip.cluster_ip]  # A unchanged


def test_ptr_for_cluster_ips_and_pods(rich: tuple[Cluster, DNSServer]) -> None:
    cluster, _ = rich
    catalog = cluster.state.service("shop", "catalog")
    assert catalog is not None and catalog.cluster_ip
    reverse = ".".join(reversed(catalog.cluster_ip.split("."))) + ".in-addr.arpa."
    assert _texts(_udp(reverse, "PTR")) == ["catalog.shop.svc.cluster.local."]
    pod = next(p for p in cluster.state.pods if p.owner_name == "frontend")
    reverse = ".".join(reversed(pod.ip.split("."))) + ".in-addr.arpa."
    expected = f"{pod.ip.replace('.', '-')}.shop.pod.cluster.local."
    assert _texts(_udp(reverse, "PTR")) == [expected]


def test_external_name_is_a_cname_chased_to_the_internet(rich: tuple[Cluster, DNSServer]) -> None:
    reply = _udp("payments.shop.svc.cluster.local.")
    kinds = [(rrset.rdtype, [r.to_text() for r in rrset]) for rrset in reply.answer]
    assert kinds == [
        (dns.rdatatype.CNAME, ["payments.example.net."]),
        (dns.rdatatype.A, ["127.50.0.10"]),
    ]


def test_kubernetes_default_and_ttl_and_tcp(rich: tuple[Cluster, DNSServer]) -> None:
    cluster, srv = rich
    reply = _udp("KUBERNETES.default.svc.cluster.local.", tcp=True)
    assert _texts(reply) == ["127.96.0.1"]
    assert reply.answer[0].ttl == 5  # the shipped coredns ConfigMap's `ttl 5`
    from mesh.model.manifests import dns_config

    cluster.apply([dns_config("kubernetes cluster.local {\n ttl 12\n}", "corefile")])
    srv.set_state(cluster.state)
    assert _udp("kubernetes.default.svc.cluster.local.").answer[0].ttl == 12
    cluster.state.dns.ttl = None  # no ConfigMap: the server's --ttl (30 here)
    srv.set_state(cluster.state)
    assert _udp("kubernetes.default.svc.cluster.local.").answer[0].ttl == 30
    resolver = PodResolver((EXTRA_IP, EXTRA_PORT), SEARCH, 5, "p", "shop")
    lookup = resolver.lookup("kubernetes.default")
    assert lookup.rcodes == ["NXDOMAIN", "NOERROR"] and lookup.answer == ["127.96.0.1"]


def test_an_external_name_costs_the_search_path_first(rich: tuple[Cluster, DNSServer]) -> None:
    resolver = PodResolver((EXTRA_IP, EXTRA_PORT), SEARCH, 5, "p", "shop")
    lookup = resolver.lookup("payments.example.net")
    assert lookup.queries == [
        "payments.example.net.shop.svc.cluster.local.",
        "payments.example.net.svc.cluster.local.",
        "payments.example.net.cluster.local.",
        "payments.example.net.",
    ]
    assert lookup.rcodes == ["NXDOMAIN", "NXDOMAIN", "NXDOMAIN", "NOERROR"]
    assert lookup.answer == ["127.50.0.10"]


def test_dns_egress_policy_is_enforced(rich: tuple[Cluster, DNSServer]) -> None:
    """The shop's allow-dns policy lets its pods ask; without it, queries are dropped."""
    import dns.exception
    import dns.query

    cluster, srv = rich
    pod = next(p for p in cluster.state.pods if p.owner_name == "frontend")
    query = dns.message.make_query("catalog.shop.svc.cluster.local.", "A")
    reply = dns.query.udp(query, EXTRA_IP, port=EXTRA_PORT, timeout=1, source=pod.ip)
    assert reply.answer
    allow_dns = next(p for p in cluster.state.network_policies if p.name == "allow-dns")
    cluster.state.network_policies.remove(allow_dns)
    srv.set_state(cluster.state)
    try:
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(query, EXTRA_IP, port=EXTRA_PORT, timeout=0.5, source=pod.ip)
        # a client no policy selects is still answered
        assert dns.query.udp(query, EXTRA_IP, port=EXTRA_PORT, timeout=1).answer
    finally:
        cluster.state.network_policies.append(allow_dns)
        srv.set_state(cluster.state)


def test_a_repeated_query_gets_the_same_answer_under_its_own_id(
    rich: tuple[Cluster, DNSServer],
) -> None:
    first, second = (
        _udp("frontend.shop.svc.cluster.local."),
        _udp("frontend.shop.svc.cluster.local."),
    )
    assert _texts(first) == _texts(second) and len(_texts(first)) == 1
    query = dns.message.make_query("frontend.shop.svc.cluster.local.", "A")
    query.id = 4242
    wire = rich[1].handle(query.to_wire(), "udp")
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.id == 4242 and _texts(reply) == _texts(first)
