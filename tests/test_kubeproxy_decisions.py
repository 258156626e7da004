"""Packet-flow table for the kube-proxy emulator, in the style of kube-proxy's own tests.

Each row: Service type and traffic policy, a source and a destination → the endpoints the
connection may reach and whether it is SNATed. Every row is checked under every proxy mode
(iptables random, ipvs rr/lc/sh): modes change *which* candidate is picked, never the set.
"""

from __future__ import annotations

import pytest

from mesh.kubeproxy.rules import (
    IptablesRandom,
    IpvsLeastConnection,
    IpvsRoundRobin,
    IpvsSourceHash,
    Selector,
    build_rules,
    decide,
    hairpin_snat,
)
from mesh.model.types import (
    ClusterState,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Service,
    ServicePort,
)

NODES = {"node-a": "127.10.0.1", "node-b": "127.10.0.2"}
A1, A2, B1, B2 = "127.244.1.2", "127.244.1.3", "127.244.2.2", "127.244.2.3"
POD_CLIENT, EXTERNAL = "127.244.1.9", "127.100.0.1"
VIP, LB = "127.96.0.50", "127.200.0.9"


def _state(svc_type: str, policy: str, b1_ready: bool = True) -> ClusterState:
    endpoints = [
        Endpoint([A1], True, True, False, "a1", "node-a"),
        Endpoint([A2], True, True, False, "a2", "node-a"),
        Endpoint([B1], b1_ready, b1_ready, False, "b1", "node-b"),
        Endpoint([B2], False, False, True, "b2", "node-b"),  # terminating: never a target
    ]
    svc = Service(
        "web",
        "demo",
        type=svc_type,
        cluster_ip=VIP,
        ports=[
            ServicePort(80, "http", "http", node_port=30080 if svc_type != "ClusterIP" else None)
        ],
        external_traffic_policy=policy,
        load_balancer_ingress=[LB] if svc_type == "LoadBalancer" else [],
    )
    return ClusterState(
        nodes=[Node(n, ip, "") for n, ip in NODES.items()],
        services=[svc],
        endpoint_slices=[
            EndpointSlice("web-1", "demo", "web", endpoints, [EndpointPort(8080, "http")])
        ],
    )


# (type, policy, source, destination, b1 ready) → (endpoints reachable, SNAT source or None)
FLOWS = [
    ("ClusterIP", "Cluster", POD_CLIENT, (VIP, 80), True, {"a1", "a2", "b1"}, None),
    ("ClusterIP", "Local", POD_CLIENT, (VIP, 80), True, {"a1", "a2", "b1"}, None),
    ("NodePort", "Cluster", POD_CLIENT, (VIP, 80), True, {"a1", "a2", "b1"}, None),
    (
        "NodePort",
        "Cluster",
        EXTERNAL,
        (NODES["node-a"], 30080),
        True,
        {"a1", "a2", "b1"},
        NODES["node-a"],
    ),
    (
        "NodePort",
        "Cluster",
        EXTERNAL,
        (NODES["node-b"], 30080),
        True,
        {"a1", "a2", "b1"},
        NODES["node-b"],
    ),
    ("NodePort", "Local", EXTERNAL, (NODES["node-a"], 30080), True, {"a1", "a2"}, None),
    ("NodePort", "Local", EXTERNAL, (NODES["node-b"], 30080), True, {"b1"}, None),
    ("NodePort", "Local", EXTERNAL, (NODES["node-b"], 30080), False, set(), None),
    ("LoadBalancer", "Cluster", EXTERNAL, (LB, 80), True, {"node-a", "node-b"}, None),
    ("LoadBalancer", "Local", EXTERNAL, (LB, 80), True, {"node-a", "node-b"}, None),
    ("LoadBalancer", "Local", EXTERNAL, (LB, 80), False, {"node-a"}, None),
    ("LoadBalancer", "Local", EXTERNAL, (NODES["node-b"], 30080), True, {"b1"}, None),
    (
        "LoadBalancer",
        "Cluster",
        EXTERNAL,
        (NODES["node-a"], 30080),
        True,
        {"a1", "a2", "b1"},
        NODES["node-a"],
    ),
]


def _selectors(opened: dict[str, int]) -> list[Selector]:
    least = IpvsLeastConnection(lambda address: opened.get(address, 0))
    return [IptablesRandom(), IpvsRoundRobin(), least, IpvsSourceHash()]


@pytest.mark.parametrize(
    ("svc_type", "policy", "src", "dst", "b1_ready", "expected", "snat"), FLOWS
)
@pytest.mark.parametrize("selector_index", range(4), ids=["iptables", "rr", "lc", "sh"])
def test_packet_flow(
    svc_type: str,
    policy: str,
    src: str,
    dst: tuple[str, int],
    b1_ready: bool,
    expected: set[str],
    snat: str | None,
    selector_index: int,
) -> None:
    rules = build_rules(_state(svc_type, policy, b1_ready), NODES).rules
    rule = rules[dst]
    decision = decide(rule, src, NODES)
    assert {e.pod for e in decision.candidates} == expected
    assert decision.snat_ip == snat
    opened: dict[str, int] = {}  # connections stay open, so lc spreads them
    selector = _selectors(opened)[selector_index]
    reached = set()
    for i in range(60):
        client = src if selector_index != 3 else f"127.100.{i}.1"  # sh hashes the source
        endpoint = selector.pick(rule, decision.candidates, client)
        if endpoint is not None:
            reached.add(endpoint.pod)
            opened[endpoint.address] = opened.get(endpoint.address, 0) + 1
    assert reached == expected


def test_headless_and_external_name_have_no_rules() -> None:
    state = _state("ClusterIP", "Cluster")
    state.services[0].cluster_ip = "None"
    assert build_rules(state, NODES).rules == {}
    state.services[0].type, state.services[0].external_name = "ExternalName", "example.com"
    assert build_rules(state, NODES).rules == {}


def test_hairpin_is_masqueraded_to_the_node() -> None:
    rules = build_rules(_state("ClusterIP", "Cluster"), NODES).rules
    a1 = next(e for e in rules[(VIP, 80)].endpoints if e.pod == "a1")
    assert hairpin_snat(a1, A1, NODES) == NODES["node-a"]
    assert hairpin_snat(a1, POD_CLIENT, NODES) is None


def test_round_robin_takes_turns_and_source_hash_sticks() -> None:
    rule = build_rules(_state("ClusterIP", "Cluster"), NODES).rules[(VIP, 80)]
    candidates = rule.ready_endpoints
    rr = IpvsRoundRobin()
    assert [rr.pick(rule, candidates, EXTERNAL).pod for _ in range(6)] == ["a1", "a2", "b1"] * 2  # type: ignore[union-attr]
    sh = IpvsSourceHash()
    assert len({sh.pick(rule, candidates, EXTERNAL).pod for _ in range(10)}) == 1  # type: ignore[union-attr]


def test_least_connection_prefers_the_idle_endpoint() -> None:
    rule = build_rules(_state("ClusterIP", "Cluster"), NODES).rules[(VIP, 80)]
    active = {f"{A1}:8080": 3, f"{A2}:8080": 1, f"{B1}:8080": 2}
    lc = IpvsLeastConnection(lambda address: active[address])
    assert lc.pick(rule, rule.ready_endpoints, EXTERNAL).pod == "a2"  # type: ignore[union-attr]


def test_health_check_node_port_counts_local_endpoints() -> None:
    state = _state("LoadBalancer", "Local", b1_ready=False)
    state.services[0].health_check_node_port = 30099
    checks = build_rules(state, NODES).health_checks
    assert checks[(NODES["node-a"], 30099)].local_endpoints == 2
    assert checks[(NODES["node-b"], 30099)].local_endpoints == 0


def test_multi_port_service_with_named_target_ports() -> None:
    state = _state("NodePort", "Cluster")
    svc = state.services[0]
    svc.ports = [
        ServicePort(80, "http", "http", node_port=30080),
        ServicePort(9090, "metrics", "metrics", node_port=30090),
    ]
    state.endpoint_slices[0].ports = [EndpointPort(8080, "http"), EndpointPort(9464, "metrics")]
    rules = build_rules(state, NODES).rules
    assert {e.port for e in rules[(VIP, 80)].endpoints} == {8080}
    assert {e.port for e in rules[(VIP, 9090)].endpoints} == {9464}
    assert {e.port for e in rules[(NODES["node-b"], 30090)].endpoints} == {9464}
