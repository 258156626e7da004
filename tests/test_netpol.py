"""NetworkPolicy semantics, table-driven, from the behaviour the Kubernetes docs describe.

Policies are written as YAML and loaded through the same validating loader as manifests.
Each row: source, destination, port/protocol → allowed or denied, and which side denies.
"""

from __future__ import annotations

import pytest
import yaml
from prometheus_client import CollectorRegistry

from mesh.model.manifests import load_document
from mesh.model.policy import PolicyEngine
from mesh.model.types import (
    ClusterState,
    Container,
    ContainerPort,
    Namespace,
    NetworkPolicy,
    Pod,
)
from mesh.policy_metrics import DENIED_CONNECTIONS, PolicyEnforcementMetrics

POLICIES = """
# The documentation's "test-network-policy", on loopback addresses.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: test-network-policy, namespace: default}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from:
        - ipBlock: {cidr: 127.17.0.0/16, except: [127.17.1.0/24]}
        - namespaceSelector: {matchLabels: {project: myproject}}
        - podSelector: {matchLabels: {role: frontend}}
      ports: [{protocol: TCP, port: 6379}]
  egress:
    - to: [{ipBlock: {cidr: 127.0.1.0/24}}]
      ports: [{protocol: TCP, port: 5978}]
---
# "deny all ingress" in a namespace, plus a second policy opening one port: the union wins.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: locked}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: locked}
spec:
  podSelector: {matchExpressions: [{key: tier, operator: In, values: [web, edge]}]}
  ingress:
    - from:
        # one element: namespace AND pod must match
        - namespaceSelector: {matchLabels: {user: alice}}
          podSelector: {matchLabels: {role: client}}
      ports: [{port: http}]
    - ports: [{protocol: TCP, port: 32000, endPort: 32768}]
---
# "deny all egress" except DNS to kube-system, the notes' first step.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: jail}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
    - to:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
          podSelector: {matchLabels: {k8s-app: kube-dns}}
      ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
"""

DB, FRONTEND, OTHER_FE, PROD = "127.244.1.2", "127.244.1.3", "127.244.1.4", "127.244.1.5"
WEB, EDGE, PLAIN, ALICE_CLIENT, ALICE_OTHER, BOB_CLIENT = (
    "127.244.2.2",
    "127.244.2.3",
    "127.244.2.4",
    "127.244.2.5",
    "127.244.2.6",
    "127.244.2.7",
)
JAILED, COREDNS = "127.244.1.8", "127.244.1.9"


def _pod(name: str, ns: str, ip: str, labels: dict[str, str], ports: dict[str, int]) -> Pod:
    container = Container("main", "img", ports=[ContainerPort(n, name=p) for p, n in ports.items()])
    return Pod(name, ns, labels, "node-a", ip, [container], phase="Running")


def _engine() -> PolicyEngine:
    policies = [
        load_document(doc, "policies.yaml", i) for i, doc in enumerate(yaml.safe_load_all(POLICIES))
    ]
    assert all(isinstance(p, NetworkPolicy) for p in policies)
    namespaces = [
        Namespace(name, {"kubernetes.io/metadata.name": name, **labels})
        for name, labels in {
            "default": {},
            "other": {},
            "prod": {"project": "myproject"},
            "locked": {},
            "alice": {"user": "alice"},
            "bob": {"user": "bob"},
            "jail": {},
            "kube-system": {},
        }.items()
    ]
    pods = [
        _pod("db", "default", DB, {"role": "db"}, {"redis": 6379}),
        _pod("frontend", "default", FRONTEND, {"role": "frontend"}, {"http": 8080}),
        _pod("other-fe", "other", OTHER_FE, {"role": "frontend"}, {"http": 8080}),
        _pod("prod", "prod", PROD, {"role": "anything"}, {}),
        _pod("web", "locked", WEB, {"tier": "web"}, {"http": 8080}),
        _pod("edge", "locked", EDGE, {"tier": "edge"}, {"http": 9090}),
        _pod("plain", "locked", PLAIN, {"tier": "db"}, {"http": 8080}),
        _pod("client", "alice", ALICE_CLIENT, {"role": "client"}, {}),
        _pod("other", "alice", ALICE_OTHER, {"role": "batch"}, {}),
        _pod("client", "bob", BOB_CLIENT, {"role": "client"}, {}),
        _pod("jailed", "jail", JAILED, {"app": "x"}, {}),
        _pod("coredns", "kube-system", COREDNS, {"k8s-app": "kube-dns"}, {"dns": 53}),
    ]
    return PolicyEngine(
        ClusterState(pods=pods, namespaces=namespaces, network_policies=policies)  # type: ignore[arg-type]
    )


CASES = [
    # (what the docs say, src, dst, port, protocol, allowed, denying side)
    (
        "podSelector alone: same-namespace frontend may reach db",
        FRONTEND,
        DB,
        6379,
        "TCP",
        True,
        "",
    ),
    ("only the listed port is open", FRONTEND, DB, 80, "TCP", False, "ingress"),
    ("only the listed protocol is open", FRONTEND, DB, 6379, "UDP", False, "ingress"),
    (
        "podSelector alone does not match other namespaces",
        OTHER_FE,
        DB,
        6379,
        "TCP",
        False,
        "ingress",
    ),
    ("namespaceSelector alone: every pod of that namespace", PROD, DB, 6379, "TCP", True, ""),
    ("ipBlock cidr admits an outside address", "127.17.0.5", DB, 6379, "TCP", True, ""),
    ("ipBlock except carves a hole", "127.17.1.5", DB, 6379, "TCP", False, "ingress"),
    ("an address outside every peer is denied", "127.100.0.1", DB, 6379, "TCP", False, "ingress"),
    ("egress to the allowed block and port", DB, "127.0.1.7", 5978, "TCP", True, ""),
    ("egress elsewhere is denied at the source", DB, FRONTEND, 8080, "TCP", False, "egress"),
    ("pods no policy selects are not isolated", FRONTEND, OTHER_FE, 8080, "TCP", True, ""),
    ("unselected source, unselected destination", "127.100.0.1", FRONTEND, 8080, "TCP", True, ""),
    (
        "default deny: a pod no allow rule selects",
        ALICE_CLIENT,
        PLAIN,
        8080,
        "TCP",
        False,
        "ingress",
    ),
    (
        "union: allow-web adds to default deny (named port)",
        ALICE_CLIENT,
        WEB,
        8080,
        "TCP",
        True,
        "",
    ),
    ("named port resolves per destination pod", ALICE_CLIENT, EDGE, 9090, "TCP", True, ""),
    (
        "named port does not match a different number",
        ALICE_CLIENT,
        EDGE,
        8080,
        "TCP",
        False,
        "ingress",
    ),
    ("ns AND pod selector: right ns, wrong pod", ALICE_OTHER, WEB, 8080, "TCP", False, "ingress"),
    ("ns AND pod selector: right pod, wrong ns", BOB_CLIENT, WEB, 8080, "TCP", False, "ingress"),
    ("endPort range: first port", BOB_CLIENT, WEB, 32000, "TCP", True, ""),
    ("endPort range: last port", BOB_CLIENT, WEB, 32768, "TCP", True, ""),
    ("endPort range: one past the end", BOB_CLIENT, WEB, 32769, "TCP", False, "ingress"),
    ("default deny egress still lets DNS out", JAILED, COREDNS, 53, "UDP", True, ""),
    ("DNS over TCP too", JAILED, COREDNS, 53, "TCP", True, ""),
    ("but nothing else", JAILED, FRONTEND, 8080, "TCP", False, "egress"),
    ("egress isolation does not isolate ingress", FRONTEND, JAILED, 8080, "TCP", True, ""),
]


@pytest.mark.parametrize(
    ("src", "dst", "port", "protocol", "allowed", "side"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_policy_table(
    src: str, dst: str, port: int, protocol: str, allowed: bool, side: str
) -> None:
    verdict = _engine().check(src, dst, port, protocol)
    assert verdict.allowed is allowed, verdict.reason
    assert verdict.side == side
    if not allowed:
        assert verdict.reason and verdict.policies


def test_verdict_attributes_name_the_policy_and_side() -> None:
    denied = _engine().check(FRONTEND, DB, 80)
    attrs = denied.attributes()
    assert attrs["hopscope.policy.verdict"] == "deny"
    assert attrs["hopscope.policy.side"] == "ingress"
    assert attrs["hopscope.policy.names"] == "default/test-network-policy"
    allowed = _engine().check(FRONTEND, DB, 6379)
    assert allowed.attributes()["hopscope.policy.verdict"] == "allow"
    assert _engine().check(FRONTEND, OTHER_FE, 8080).attributes() == {}


def test_denials_are_counted_by_policy_and_side_on_the_registry_given() -> None:
    registry = CollectorRegistry()
    metrics = PolicyEnforcementMetrics(registry)
    denied = _engine().check(FRONTEND, DB, 80)
    metrics.count_denied("default", "db", denied)
    metrics.count_denied("default", "db", denied)
    labels = {
        "namespace": "default",
        "pod": "db",
        "policy": "default/test-network-policy",
        "side": "ingress",
    }
    assert registry.get_sample_value(f"{DENIED_CONNECTIONS}_total", labels) == 2
    assert DENIED_CONNECTIONS == "hopscope_networkpolicy_denied_connections"  # dashboards
    PolicyEnforcementMetrics(CollectorRegistry())  # a second component's own registry: no clash


def test_policy_types_default_from_the_spec() -> None:
    from mesh.model.policy import policy_types

    ingress_only = NetworkPolicy("a", "x", {"podSelector": {}})
    with_egress = NetworkPolicy("b", "x", {"podSelector": {}, "egress": []})
    assert policy_types(ingress_only) == ["Ingress"]
    assert policy_types(with_egress) == ["Ingress", "Egress"]


def test_empty_ingress_list_denies_and_empty_rule_allows_all() -> None:
    engine = _engine()
    deny_all = NetworkPolicy("deny", "other", {"podSelector": {}, "ingress": []})
    engine.policies.append(deny_all)
    assert not engine.check(FRONTEND, OTHER_FE, 8080).allowed
    engine.policies.append(NetworkPolicy("all", "other", {"podSelector": {}, "ingress": [{}]}))
    assert engine.check(FRONTEND, OTHER_FE, 8080).allowed


def test_one_engine_per_state_version() -> None:
    first, second = ClusterState(), ClusterState()
    engine = PolicyEngine.for_state(first)
    assert PolicyEngine.for_state(first) is engine  # a flood of drops: built once
    assert PolicyEngine.for_state(second) is not engine  # a changed state: a new engine
    assert PolicyEngine.for_state(second).state is second
    changed = PolicyEngine.for_state(second)
    second.resource_version += 1  # the control plane's state changes in place
    assert PolicyEngine.for_state(second) is not changed
