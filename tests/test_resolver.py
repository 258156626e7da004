"""The pod's stub resolver against a real UDP server that misbehaves on purpose.

The server answers each query with whatever the test queued: garbage, a reply with the
wrong ID, a reply to another name, then (maybe) the right reply. The resolver must take
only the reply to the query it sent, and its parse cache must never hand one name's answer
to another.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from mesh.dns import resolver as resolver_module
from mesh.dns.resolver import PodResolver

SERVER_IP = "127.53.0.1"
POD_IP = "127.244.53.9"
SEARCH = ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"]

Replies = Callable[[dns.message.Message], list[bytes]]


def _reply(query: dns.message.Message, address: str | None) -> dns.message.Message:
    reply = dns.message.make_response(query)
    if address is None:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    else:
        name = query.question[0].name
        reply.answer.append(dns.rrset.from_text(name, 30, "IN", "A", address))
    return reply


class _Server:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((SERVER_IP, 0))
        self.port = self.sock.getsockname()[1]
        self.behaviour: Replies = lambda q: [_reply(q, "127.96.0.10").to_wire()]
        self.queries: list[str] = []
        self.peers: list[str] = []
        self.flags: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            self.queries.append(query.question[0].name.to_text())
            self.peers.append(peer[0])
            self.flags.append(query.flags)
            for packet in self.behaviour(query):
                self.sock.sendto(packet, peer)


@pytest.fixture()
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.sock.close()


def _resolver(server: _Server) -> PodResolver:
    return PodResolver((SERVER_IP, server.port), SEARCH, 5, "p", "shop", source_ip=POD_IP)


def test_only_the_reply_to_our_query_is_taken(server: _Server) -> None:
    def noisy(query: dns.message.Message) -> list[bytes]:
        right = _reply(query, "127.96.0.10")
        wrong_id = _reply(query, "127.96.6.6")
        wrong_id.id = (query.id + 1) % 65536
        other = dns.message.make_query("evil.example.", "A")
        other.id = query.id
        other_reply = _reply(other, "127.96.7.7")
        return [b"\x00garbage", wrong_id.to_wire(), other_reply.to_wire(), right.to_wire()]

    server.behaviour = noisy
    resolver = _resolver(server)
    for _ in range(3):  # the second and third time from the parse cache
        lookup = resolver.lookup("catalog")
        assert lookup.answer == ["127.96.0.10"]
        assert lookup.rcodes == ["NOERROR"]


def test_every_lookup_asks_the_server_and_names_are_not_mixed(server: _Server) -> None:
    addresses = {"catalog.shop.svc.cluster.local.": "127.96.0.10"}

    def by_name(query: dns.message.Message) -> list[bytes]:
        return [_reply(query, addresses.get(query.question[0].name.to_text())).to_wire()]

    server.behaviour = by_name
    resolver = _resolver(server)
    for _ in range(5):
        assert resolver.resolve("catalog") == ["127.96.0.10"]
    # The search walk for a missing name: three NXDOMAINs, then the absolute name.
    lookup = resolver.lookup("reviews")
    assert lookup.answer == [] and lookup.rcodes == ["NXDOMAIN"] * 4
    assert server.queries.count("catalog.shop.svc.cluster.local.") == 5
    assert server.queries[-4:] == [
        "reviews.shop.svc.cluster.local.",
        "reviews.svc.cluster.local.",
        "reviews.cluster.local.",
        "reviews.",
    ]
    # A name that appears later is answered, not served from another name's reply.
    addresses["reviews.shop.svc.cluster.local."] = "127.96.0.20"
    assert resolver.resolve("reviews") == ["127.96.0.20"]


def test_a_silent_server_is_a_timeout_for_each_query(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolver_module, "DNS_TIMEOUT", 0.2)
    server.behaviour = lambda q: []
    lookup = _resolver(server).lookup("catalog.shop.svc.cluster.local.")
    assert lookup.rcodes == ["TIMEOUT"] and lookup.answer == []


def test_queries_leave_from_the_pods_address_asking_for_recursion(server: _Server) -> None:
    resolver = _resolver(server)
    assert resolver.resolve("catalog") == ["127.96.0.10"]
    assert server.peers == [POD_IP]
    assert server.flags[0] & dns.flags.RD
