"""Cluster DNS answers from the model, over real UDP, and survives garbage."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import dns.message
import dns.rcode
import pytest

from apps.podnet import PodResolver, ResolveError, candidates
from mesh.dns.__main__ import DNSServer, serve
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


def test_unknown_names_are_nxdomain_and_outside_names_refused(server: DNSServer) -> None:
    assert _ask(server, "nope.shop.svc.cluster.local.").rcode() == dns.rcode.NXDOMAIN
    assert _ask(server, "example.com.").rcode() == dns.rcode.REFUSED


def test_garbage_gets_formerr_or_nothing(server: DNSServer) -> None:
    reply = server.handle(b"\x12\x34" + b"\xff" * 20, "udp")
    assert reply is not None and reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR
    assert server.handle(b"\x01", "udp") is None
    assert _ask(server, "catalog.shop.svc.cluster.local.").rcode() == dns.rcode.NOERROR


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
