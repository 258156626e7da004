"""Metrics shared by every NetworkPolicy enforcement point (kube-proxy and the node gateway)."""

from __future__ import annotations

from prometheus_client import Counter

POLICY_DENIED = Counter(
    "hopscope_networkpolicy_denied_connections",
    "Connections dropped by NetworkPolicy, by the policy and side that denied them",
    ["namespace", "pod", "policy", "side"],
)
