"""The service map Tempo would draw from real traces of the local cluster.

:func:`service_graph_edges` applies the pairing rules of Tempo's metrics-generator, as its
documentation states them (Grafana Tempo, "Service graphs" → "How they work" and "Virtual
nodes"):

* a ``client`` span and a ``server`` span whose parent is that client span form an edge
  from the client span's ``service.name`` to the server span's (``producer`` / ``consumer``
  likewise, as a messaging edge);
* a ``client`` span with ``db.namespace``, ``db.name`` or ``db.system`` is a database
  request: an edge at once, to ``peer.service``, ``server.address``,
  ``network.peer.address[:network.peer.port]``, ``db.namespace`` or ``db.name``, first found;
* a ``client`` span left without its server span but with a peer attribute (``peer.service``,
  ``db.name``, ``db.system``, first found) is an edge to a *virtual node* of that name;
* a root ``server`` span left without its client span is an edge from the virtual node
  named by its peer attribute, or ``user``.

Spans of any other kind form no edge. The function is applied to traces fetched from the
running cluster's trace store.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e_support import (
    dataplane,
    hop_names,
    hopscope,
    poll_until,
    trace_json,
)

PEER_ATTRIBUTES = ("peer.service", "db.name", "db.system")
"""Tempo's default ``peer_attributes``."""

DATABASE_ATTRIBUTES = ("db.namespace", "db.name", "db.system")
DATABASE_NODE_NAMES = ("peer.service", "server.address")

Edge = tuple[str, str, str]
"""(client, server, connection_type) — the labels of ``traces_service_graph_request_total``."""


def _service(span: dict[str, Any]) -> str:
    return str(span["resource"].get("service.name", ""))


def _first(attrs: dict[str, Any], keys: tuple[str, ...]) -> str:
    return next((str(attrs[k]) for k in keys if attrs.get(k) not in (None, "")), "")


def _database_node(attrs: dict[str, Any]) -> str:
    name = _first(attrs, DATABASE_NODE_NAMES)
    if name:
        return name
    if attrs.get("network.peer.address"):
        port = attrs.get("network.peer.port")
        return (
            f"{attrs['network.peer.address']}:{port}"
            if port
            else str(attrs["network.peer.address"])
        )
    return _first(attrs, ("db.namespace", "db.name"))


def service_graph_edges(spans: list[dict[str, Any]]) -> list[Edge]:
    """Every edge (with repeats) Tempo's service-graph processor records for these spans."""
    edges: list[Edge] = []
    clients = {
        s["span_id"]: s for s in spans if s["kind"] in ("client", "producer") and _service(s)
    }
    paired: set[str] = set()
    for span in spans:
        if span["kind"] in ("client", "producer") and _first(
            span["attributes"], DATABASE_ATTRIBUTES
        ):
            paired.add(span["span_id"])
            edges.append((_service(span), _database_node(span["attributes"]), "database"))
    for span in spans:
        if span["kind"] not in ("server", "consumer") or not _service(span):
            continue
        client = clients.get(span["parent_span_id"])
        if client is not None and client["span_id"] not in paired:
            paired.add(client["span_id"])
            kind = "messaging_system" if span["kind"] == "consumer" else ""
            edges.append((_service(client), _service(span), kind))
        elif not span["parent_span_id"]:
            peer = _first(span["attributes"], PEER_ATTRIBUTES) or "user"
            edges.append((peer, _service(span), "virtual_node"))
    for span_id, client in clients.items():
        if span_id in paired:
            continue
        peer = _first(client["attributes"], PEER_ATTRIBUTES)
        if peer:
            edges.append((_service(client), peer, "virtual_node"))
    return edges


# -- the rules themselves, on hand-made spans ------------------------------------------------


def _span(span_id: str, parent: str, kind: str, service: str, **attrs: Any) -> dict[str, Any]:
    return {
        "span_id": span_id,
        "parent_span_id": parent,
        "kind": kind,
        "resource": {"service.name": service},
        "attributes": attrs,
    }


def test_pairing_rules_as_documented() -> None:
    spans = [
        _span("a", "", "client", "cli"),
        _span("b", "a", "server", "web"),
        _span("c", "b", "client", "web"),
        _span("d", "c", "internal", "proxy"),  # an INTERNAL child breaks no pair...
        _span("e", "d", "server", "api"),  # ...but a server below it is not c's child
        _span("f", "b", "client", "web", **{"peer.service": "payments"}),
        _span("g", "b", "client", "web", **{"db.system": "redis", "server.address": "cache"}),
        _span("h", "", "server", "batch"),
    ]
    assert sorted(service_graph_edges(spans)) == sorted(
        [
            ("cli", "web", ""),
            ("web", "payments", "virtual_node"),
            ("web", "cache", "database"),
            ("user", "batch", "virtual_node"),
        ]
    )


# -- on the running cluster ----------------------------------------------------------------

REQUIRED_EDGES = {
    ("ingress", "frontend"),
    ("frontend", "catalog"),
    ("frontend", "reviews"),
    ("reviews", "ratings"),
    ("catalog", "cache"),
}
KUBE_PROXY_EDGES = {
    ("kube-proxy", "frontend"),
    ("kube-proxy", "catalog"),
    ("kube-proxy", "reviews"),
    ("kube-proxy", "ratings"),
}


def _journey(env: dict[str, str]) -> dict[str, Any]:
    doc = json.loads(hopscope("curl", "--json", "http://shop.local/", env=env).stdout)
    assert doc["status"] == 200, doc

    def complete() -> dict[str, Any] | None:
        view = trace_json(doc["trace_id"])
        hops = hop_names(view)
        # every app, and kube-proxy in front of each of the four Services (on the kernel
        # path its hops are written once the callee's span is in)
        whole = hops.count("app") >= 5 and hops.count("kube-proxy") >= 4
        # every span in (the relays write two per kube-proxy hop: 28 on the userspace path)
        least = 28 if dataplane() == "userspace" else 24
        return view if whole and len(view["spans"]) >= least else None

    return poll_until(complete, timeout=15)


@pytest.mark.e2e
def test_tempo_pairing_on_real_traces_yields_the_journey(cluster: dict[str, str]) -> None:
    edges: set[Edge] = set()
    for _ in range(3):  # the cache shard and pod placement vary per request
        edges |= set(service_graph_edges(_journey(cluster)["spans"]))
    direct = {(c, s) for c, s, kind in edges if kind == ""}
    virtual = {(c, s) for c, s, kind in edges if kind == "virtual_node"}
    assert direct >= REQUIRED_EDGES, sorted(edges)
    assert ("hopscope-cli", "ingress") in direct, sorted(edges)
    # kube-proxy is a node of its own, in front of every Service it balances...
    assert virtual >= KUBE_PROXY_EDGES, sorted(edges)
    # ...and cluster DNS a virtual node every app asks.
    assert ("frontend", "kube-dns") in virtual, sorted(edges)
    # Pod-to-pod traffic (catalog → its cache shard) does not pass kube-proxy.
    assert ("kube-proxy", "cache") not in virtual, sorted(edges)


@pytest.mark.e2e
def test_every_pair_is_a_sidecar_pair_and_the_journey_still_nests(
    cluster: dict[str, str],
) -> None:
    """The callee's SERVER span is the direct child of the caller's sidecar CLIENT span,
    while hopscope's own view still shows kube-proxy between them."""
    view = _journey(cluster)
    spans = {s["span_id"]: s for s in view["spans"]}
    for span in spans.values():
        if span["attributes"].get("hopscope.hop") != "sidecar-inbound":
            continue
        parent = spans[span["parent_span_id"]]
        assert parent["kind"] == "client", (span["name"], parent["name"])
        assert parent["attributes"]["hopscope.hop"] in ("sidecar-outbound", "ingress")
    hops = {h["span_id"]: h for h in view["hops"]}
    for hop in view["hops"]:
        if hop["hop"] == "sidecar-inbound" and hop["where"].startswith(("frontend", "reviews")):
            above = hops[hop["parent_hop_id"]]
            if above["hop"] == "cni-overlay":
                above = hops[above["parent_hop_id"]]
            assert above["hop"] == "kube-proxy", (hop["where"], above)
