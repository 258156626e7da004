"""The data path's metric families, the same on both data paths.

The userspace relays (``mesh.kubeproxy``, ``mesh.cni``) count what they carry; on the
kernel data path the kube-proxy observer (:mod:`mesh.kernel.flowmetrics`) counts the same
connections from the nodes' conntrack events, and the control plane's hop joiner times the
requests. Dashboards and recording rules query these names, so each family is defined once
here; every process builds the ones it serves on its registry (building one twice on a
registry is a ``ValueError``, so each process calls each builder once).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass(frozen=True)
class KubeProxyMetrics:
    """kube-proxy's per-Service series."""

    rules: Gauge
    rejecting: Gauge
    connections: Counter
    active: Gauge
    bytes: Counter
    rejected: Counter

    @classmethod
    def build(cls, registry: CollectorRegistry = REGISTRY) -> KubeProxyMetrics:
        return cls(
            rules=Gauge(
                "hopscope_kubeproxy_service_ports",
                "Proxied Service VIP:port pairs",
                registry=registry,
            ),
            rejecting=Gauge(
                "hopscope_kubeproxy_rejecting_service_ports",
                "Service addresses refusing connections (no ready endpoint: REJECT)",
                ["namespace", "service", "kind"],
                registry=registry,
            ),
            connections=Counter(
                "hopscope_kubeproxy_connections",
                "Connections DNATed to an endpoint",
                ["namespace", "service", "endpoint_pod"],
                registry=registry,
            ),
            active=Gauge(
                "hopscope_kubeproxy_active_connections",
                "Open connections to a Service (conntrack entries not yet destroyed)",
                ["namespace", "service"],
                registry=registry,
            ),
            bytes=Counter(
                "hopscope_kubeproxy_bytes",
                "Bytes per endpoint (in: client to endpoint, out: endpoint to client)",
                ["namespace", "service", "endpoint_pod", "direction"],
                registry=registry,
            ),
            rejected=Counter(
                "hopscope_kubeproxy_rejected_connections",
                "Connections refused (no ready endpoint, endpoint unreachable, unknown VIP)",
                ["namespace", "service", "reason"],
                registry=registry,
            ),
        )


def request_duration(registry: CollectorRegistry = REGISTRY) -> Histogram:
    """Requests through a Service, timed at its kube-proxy hop; exemplars carry the trace."""
    return Histogram(
        "hopscope_kubeproxy_request_duration_seconds",
        "Time from a request's head reaching kube-proxy to its response completing, by Service",
        ["namespace", "service"],
        buckets=REQUEST_BUCKETS,
        registry=registry,
    )


@dataclass(frozen=True)
class OverlayMetrics:
    """The CNI's VXLAN overlay between nodes."""

    tunnels: Counter
    bytes: Counter
    active: Gauge
    delay: Gauge

    @classmethod
    def build(cls, registry: CollectorRegistry = REGISTRY) -> OverlayMetrics:
        return cls(
            tunnels=Counter(
                "hopscope_cni_overlay_connections",
                "Connections encapsulated between nodes",
                ["src_node", "dst_node", "result"],
                registry=registry,
            ),
            bytes=Counter(
                "hopscope_cni_overlay_bytes",
                "Inner bytes carried through the overlay, by the node that encapsulated them",
                ["src_node", "dst_node"],
                registry=registry,
            ),
            active=Gauge(
                "hopscope_cni_overlay_active_connections",
                "Open overlay connections",
                registry=registry,
            ),
            delay=Gauge(
                "hopscope_cni_overlay_delay_seconds",
                "Configured one-way overlay delay",
                registry=registry,
            ),
        )


@dataclass(frozen=True)
class NodeRoutingMetrics:
    """What a node routes for its pods besides Services: pod to pod, and egress SNAT."""

    snat: Counter
    pods: Counter

    @classmethod
    def build(cls, registry: CollectorRegistry = REGISTRY) -> NodeRoutingMetrics:
        return cls(
            snat=Counter(
                "hopscope_cni_egress_snat_connections",
                "Connections leaving the cluster through egress SNAT",
                ["node", "egress_ip", "destination", "result"],
                registry=registry,
            ),
            pods=Counter(
                "hopscope_cni_pod_connections",
                "Direct pod-to-pod connections routed by the node (not through a Service)",
                ["node", "path"],
                registry=registry,
            ),
        )
