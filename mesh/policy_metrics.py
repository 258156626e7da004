"""Metrics of NetworkPolicy enforcement, shared by every point that enforces it.

Two components drop connections because of a NetworkPolicy: kube-proxy (a Service
connection to an endpoint the policy does not admit) and the CNI's node gateway (direct
pod-to-pod and egress traffic). Both count the drops under one metric name, so a dashboard
or an alert asks one question, whichever component said no; the ``side`` label tells
whether the sender's egress or the receiver's ingress policy denied it.

Each component builds one :class:`PolicyEnforcementMetrics` on the registry it serves on
``/metrics`` and hands it to its enforcement points; tests build one on a fresh
:class:`~prometheus_client.CollectorRegistry`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from mesh.model.policy import Verdict

DENIED_CONNECTIONS = "hopscope_networkpolicy_denied_connections"
"""Name of the denial counter (exposed with the ``_total`` suffix)."""


class PolicyEnforcementMetrics:
    """The counters of one component's NetworkPolicy enforcement points."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.denied = Counter(
            DENIED_CONNECTIONS,
            "Connections dropped by NetworkPolicy, by the policy and side that denied them",
            ["namespace", "pod", "policy", "side"],
            registry=registry,
        )
        """Denied connections by destination pod, first denying policy and side."""

    def count_denied(self, namespace: str, pod: str, verdict: Verdict) -> None:
        """Count one connection to ``namespace/pod`` that ``verdict`` denied."""
        policy = verdict.policies[0] if verdict.policies else ""
        self.denied.labels(namespace, pod, policy, verdict.side).inc()
