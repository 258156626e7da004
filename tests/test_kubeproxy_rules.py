"""Endpoint selection and rule building of the kube-proxy emulator."""

from __future__ import annotations

import random
from collections import Counter

from mesh.kubeproxy.rules import EndpointTarget, IptablesRandom, ServiceRule, build_rules
from mesh.model.controllers import Cluster
from mesh.model.manifests import default_manifest_paths, load_manifests


def _rule(ready: list[bool]) -> ServiceRule:
    endpoints = tuple(
        EndpointTarget(f"127.244.1.{i + 2}", 8080, f"pod-{i}", "node-a", r, r, False)
        for i, r in enumerate(ready)
    )
    return ServiceRule(
        "shop", "web", "http", "127.96.0.20", 80, "TCP", "ClusterIP", None, endpoints
    )


def test_iptables_rule_probabilities_match_kube_proxy() -> None:
    # kube-proxy writes 1/3, 1/2, then an unconditional jump for three endpoints.
    assert IptablesRandom.probabilities(3) == [1 / 3, 1 / 2, 1.0]
    assert IptablesRandom.probabilities(1) == [1.0]


def test_random_choice_is_uniform_over_ready_endpoints_only() -> None:
    selector = IptablesRandom(random.Random(7))
    rule = _rule([True, False, True, True])
    counts = Counter(selector.choose(rule, "127.100.0.1").pod for _ in range(6000))  # type: ignore[union-attr]
    assert set(counts) == {"pod-0", "pod-2", "pod-3"}
    for n in counts.values():
        assert 1800 < n < 2200, counts


def test_no_ready_endpoint_means_no_choice() -> None:
    assert IptablesRandom().choose(_rule([False, False]), "127.100.0.1") is None
    assert IptablesRandom().choose(_rule([]), "127.100.0.1") is None


def test_rules_cover_cluster_ips_but_not_dns() -> None:
    cluster = Cluster()
    cluster.apply(load_manifests(default_manifest_paths()))
    rules = build_rules(cluster.state).rules
    names = sorted(r.name for r in rules.values())
    assert names == ["catalog", "frontend", "ratings", "reviews"]
    catalog = next(r for r in rules.values() if r.name == "catalog")
    assert {e.port for e in catalog.endpoints} == {8080}
    assert not catalog.ready_endpoints  # nothing is ready before the kubelet probes
