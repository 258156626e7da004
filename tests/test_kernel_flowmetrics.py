"""The kernel path's data-path metrics, counted from conntrack flows as a node reports them
(:mod:`mesh.kernel.flowmetrics`): the same families the userspace relays export."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry

from mesh.kernel.conntrack import IPS_DST_NAT, IPS_SEEN_REPLY, IPS_SRC_NAT, Flow
from mesh.kernel.flowmetrics import FlowMetrics
from mesh.kernel.policy import nflog_prefix, read_nflog_prefix
from mesh.kubeproxy.rules import EndpointTarget, RuleSet, ServiceRule
from mesh.model.types import Pod

# the local plan's addresses (the process's plan): node-a's pods 127.244.1/24, node-b's .2/24
VIP, CALLER, REMOTE, LOCAL = "127.96.0.12:8080", "127.244.1.2", "127.244.2.3", "127.244.1.9"


def _rules(ready: bool = True) -> RuleSet:
    ep = EndpointTarget(REMOTE, 8080, "catalog-b", "node-b", ready, ready, False)
    rule = ServiceRule(
        "shop", "catalog", "http", "127.96.0.12", 8080, "TCP", "ClusterIP", None, (ep,)
    )
    empty = ServiceRule("shop", "empty", None, "127.96.0.13", 80, "TCP", "ClusterIP", None, ())
    return RuleSet(1, {rule.key: rule, empty.key: empty}, {})


def _metrics() -> tuple[FlowMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    rules = _rules()
    metrics = FlowMetrics(lambda: rules, lambda: 0.025, registry=registry)
    metrics.on_rules(rules)
    return metrics, registry


def _service_flow(event: str, status: int = IPS_DST_NAT, **counts: int) -> Flow:
    src = f"{CALLER}:40000"
    return Flow(7, event, "tcp", src, VIP, f"{REMOTE}:8080", src, status, 0, **counts)  # type: ignore[arg-type]


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_dnated_connection_counts_for_its_service_endpoint_and_the_overlay() -> None:
    metrics, registry = _metrics()
    metrics.observe("node-a", [_service_flow("new")])
    service = {"namespace": "shop", "service": "catalog"}
    assert _value(registry, "hopscope_kubeproxy_connections_total", **service,
                  endpoint_pod="catalog-b") == 1  # fmt: skip
    assert _value(registry, "hopscope_kubeproxy_active_connections", **service) == 1
    assert _value(registry, "hopscope_cni_overlay_active_connections") == 1
    # a dump while it is open: its bytes so far, and it was answered
    metrics.refresh(
        "node-a",
        [_service_flow("entry", IPS_DST_NAT | IPS_SEEN_REPLY, bytes_orig=300, bytes_reply=900)],
    )
    ep = {**service, "endpoint_pod": "catalog-b"}
    assert _value(registry, "hopscope_kubeproxy_bytes_total", **ep, direction="in") == 300
    assert _value(registry, "hopscope_kubeproxy_bytes_total", **ep, direction="out") == 900
    overlay = {"src_node": "node-a", "dst_node": "node-b"}
    assert _value(registry, "hopscope_cni_overlay_connections_total", **overlay, result="ok") == 1
    # destroyed: only the bytes since the dump are added; nothing is counted twice
    metrics.observe(
        "node-a",
        [_service_flow("destroy", IPS_DST_NAT | IPS_SEEN_REPLY, bytes_orig=350, bytes_reply=1000)],
    )
    assert _value(registry, "hopscope_kubeproxy_bytes_total", **ep, direction="in") == 350
    assert _value(registry, "hopscope_kubeproxy_bytes_total", **ep, direction="out") == 1000
    assert _value(registry, "hopscope_cni_overlay_bytes_total", **overlay) == 1350
    assert _value(registry, "hopscope_cni_overlay_connections_total", **overlay, result="ok") == 1
    assert _value(registry, "hopscope_kubeproxy_active_connections", **service) == 0
    assert _value(registry, "hopscope_cni_overlay_active_connections") == 0
    assert _value(registry, "hopscope_cni_overlay_delay_seconds") == 0.025
    assert _value(registry, "hopscope_kubeproxy_rejected_connections_total", **service,
                  reason="endpoint-unreachable") is None  # fmt: skip


def test_a_dnat_never_answered_is_an_unreachable_endpoint() -> None:
    metrics, registry = _metrics()
    metrics.observe("node-a", [_service_flow("new")])
    metrics.observe("node-a", [_service_flow("destroy", bytes_orig=180, bytes_reply=0)])
    service = {"namespace": "shop", "service": "catalog"}
    assert _value(registry, "hopscope_kubeproxy_rejected_connections_total", **service,
                  reason="endpoint-unreachable") == 1  # fmt: skip
    assert _value(registry, "hopscope_cni_overlay_connections_total", src_node="node-a",
                  dst_node="node-b", result="unreachable") == 1  # fmt: skip


def test_services_that_reject_are_listed_and_their_refusals_series_exists() -> None:
    metrics, registry = _metrics()
    empty = {"namespace": "shop", "service": "empty"}
    assert _value(registry, "hopscope_kubeproxy_service_ports") == 2
    assert _value(registry, "hopscope_kubeproxy_rejecting_service_ports", **empty,
                  kind="cluster-ip") == 1  # fmt: skip
    assert _value(registry, "hopscope_kubeproxy_rejected_connections_total", **empty,
                  reason="no-ready-endpoints") == 0  # fmt: skip
    metrics.on_rules(RuleSet(2, {}, {}))  # the Service is gone
    assert _value(registry, "hopscope_kubeproxy_rejecting_service_ports", **empty,
                  kind="cluster-ip") is None  # fmt: skip


def test_pod_to_pod_and_egress_flows_are_counted_by_the_node_that_routed_them() -> None:
    metrics, registry = _metrics()
    local = Flow(1, "new", "tcp", f"{CALLER}:1", f"{LOCAL}:80", f"{LOCAL}:80", f"{CALLER}:1", 0, 0)
    remote = Flow(
        2, "new", "tcp", f"{CALLER}:2", f"{REMOTE}:80", f"{REMOTE}:80", f"{CALLER}:2", 0, 0
    )
    egress = Flow(3, "new", "tcp", f"{CALLER}:3", "127.50.0.10:443", "127.50.0.10:443",
                  "127.60.0.1:3", IPS_SRC_NAT, 0)  # fmt: skip
    metrics.observe("node-a", [local, remote, egress])
    # node-b sees the remote flow arrive: not its pod's, not counted again
    metrics.observe("node-b", [Flow(9, "new", "tcp", f"{CALLER}:2", f"{REMOTE}:80",
                                    f"{REMOTE}:80", f"{CALLER}:2", 0, 0)])  # fmt: skip
    assert _value(registry, "hopscope_cni_pod_connections_total", node="node-a", path="local") == 1
    assert _value(registry, "hopscope_cni_pod_connections_total", node="node-a",
                  path="overlay") == 1  # fmt: skip
    assert _value(registry, "hopscope_cni_pod_connections_total", node="node-b",
                  path="local") is None  # fmt: skip
    answered = Flow(3, "destroy", "tcp", f"{CALLER}:3", "127.50.0.10:443", "127.50.0.10:443",
                    "127.60.0.1:3", IPS_SRC_NAT | IPS_SEEN_REPLY, 0)  # fmt: skip
    metrics.observe("node-a", [answered])
    snat = {"node": "node-a", "egress_ip": "127.60.0.1", "destination": "127.50.0.10:443"}
    assert _value(registry, "hopscope_cni_egress_snat_connections_total", **snat, result="ok") == 1


def test_a_closing_connection_leaves_the_open_gauges_once() -> None:
    metrics, registry = _metrics()
    service = {"namespace": "shop", "service": "catalog"}
    metrics.observe("node-a", [_service_flow("new")])
    closing = _service_flow("entry", IPS_DST_NAT | IPS_SEEN_REPLY, bytes_orig=10, bytes_reply=20)
    metrics.refresh("node-a", [dataclasses.replace(closing, state="TIME_WAIT")])
    assert _value(registry, "hopscope_kubeproxy_active_connections", **service) == 0
    assert _value(registry, "hopscope_cni_overlay_active_connections") == 0
    metrics.observe("node-a", [_service_flow("destroy", IPS_DST_NAT | IPS_SEEN_REPLY)])
    assert _value(registry, "hopscope_kubeproxy_active_connections", **service) == 0
    assert _value(registry, "hopscope_cni_overlay_active_connections") == 0


def test_the_deny_rules_prefix_reads_back_as_written() -> None:
    pod = Pod("frontend-a", "shop", {}, "node-a", "10.244.1.2", [])
    assert read_nflog_prefix(nflog_prefix("egress", pod)) == ("egress", "shop", "frontend-a")
    assert read_nflog_prefix("drop no-local-endpoints shop/web") is None
