"""NetworkPolicy evaluation with Kubernetes semantics.

A connection from ``src`` to ``dst:port`` is checked twice, as a CNI does on both ends:

* **egress** at the source — only if the source is a pod selected by some policy whose
  ``policyTypes`` include ``Egress``; then some egress rule of those policies must allow it;
* **ingress** at the destination — only if the destination pod is selected by some policy
  with ``Ingress``; then some ingress rule must allow it.

A pod no policy selects (for that direction) is not isolated. Policies only add allowances:
the result is the union of every rule of every policy selecting the pod. Replies of an
allowed connection are never checked (the caller checks connections, not packets).

Details that follow the API documentation: ``policyTypes`` defaults to ``Ingress`` plus
``Egress`` when the spec has an ``egress`` section; a rule without ``from``/``to`` matches
every peer and one without ``ports`` every port; ``podSelector`` alone selects pods in the
policy's namespace, ``namespaceSelector`` alone every pod of the selected namespaces, both
together the pods matching both; ``ipBlock`` matches addresses in ``cidr`` but not in
``except``; named ports are looked up on the destination pod; ``endPort`` makes a range.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from mesh.model.types import ClusterState, NetworkPolicy, Pod


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    side: str = ""
    """``egress`` (the source's policies) or ``ingress`` (the destination's) when denied."""
    policies: tuple[str, ...] = ()
    """When allowed: the ``ns/name`` policies whose rules allowed it (empty if not isolated).
    When denied: the policies that isolate the denying side."""
    reason: str = ""

    @property
    def word(self) -> str:
        return "allow" if self.allowed else "deny"

    def attributes(self) -> dict[str, Any]:
        """Span attributes, only when some policy applied (as the hop contract says)."""
        if not self.policies:
            return {}
        attrs: dict[str, Any] = {
            "hopscope.policy.verdict": self.word,
            "hopscope.policy.names": ",".join(self.policies),
        }
        if self.side:
            attrs["hopscope.policy.side"] = self.side
        if self.reason:
            attrs["hopscope.policy.reason"] = self.reason
        return attrs


def label_selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """``metav1.LabelSelector``: ``matchLabels`` and ``matchExpressions``; ``{}`` matches all."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


def policy_types(policy: NetworkPolicy) -> list[str]:
    declared = policy.spec.get("policyTypes")
    if declared:
        return list(declared)
    return ["Ingress", "Egress"] if "egress" in policy.spec else ["Ingress"]


def selects(policy: NetworkPolicy, pod: Pod) -> bool:
    return pod.namespace == policy.namespace and label_selector_matches(
        policy.spec.get("podSelector", {}), pod.labels
    )


class PolicyEngine:
    """Answers ``check(src_ip, dst_ip, port)`` for one cluster state."""

    _last: tuple[ClusterState, int, PolicyEngine] | None = None
    """The engine of the state (and its version) :meth:`for_state` was last asked about."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.policies = list(state.network_policies)
        self.pods_by_ip = {p.ip: p for p in state.pods if p.ip and p.phase != "Terminating"}

    @classmethod
    def for_state(cls, state: ClusterState) -> PolicyEngine:
        """The engine of ``state`` at its current ``resource_version``, built once per
        version (a watcher gets a new state object per change; the control plane's own
        state changes in place and bumps its version): a flood of dropped packets is judged
        against one engine (the kernel path judges each drop's NFLOG record)."""
        last = cls._last
        if last is None or last[0] is not state or last[1] != state.resource_version:
            last = (state, state.resource_version, cls(state))
            cls._last = last  # one assignment: another thread sees the old triple or this one
        return last[2]

    def check(
        self,
        src_ip: str,
        dst_ip: str,
        port: int,
        protocol: str = "TCP",
        seen_src_ip: str | None = None,
    ) -> Verdict:
        """Egress policies of ``src_ip``, then ingress policies of ``dst_ip``.

        ``seen_src_ip`` is the source the destination sees when it differs (after SNAT):
        ingress rules match that address, as they do on a real node.
        """
        src = self.pods_by_ip.get(src_ip)
        dst = self.pods_by_ip.get(dst_ip)
        allowed_by: list[str] = []
        if src is not None:
            isolating, ok = self._judge("egress", src, (dst_ip, dst, port, protocol))
            if isolating and not ok:
                return Verdict(
                    False,
                    "egress",
                    tuple(_name(p) for p in isolating),
                    f"no egress rule of {_names(isolating)} allows {src.namespace}/"
                    f"{src.name} to reach {_describe(dst_ip, dst)}:{port}/{protocol}",
                )
            allowed_by += ok
        if seen_src_ip is not None and seen_src_ip != src_ip:
            src_ip, src = seen_src_ip, self.pods_by_ip.get(seen_src_ip)
        if dst is not None:
            isolating, ok = self._judge("ingress", dst, (src_ip, src, port, protocol, dst))
            if isolating and not ok:
                return Verdict(
                    False,
                    "ingress",
                    tuple(_name(p) for p in isolating),
                    f"no ingress rule of {_names(isolating)} lets {_describe(src_ip, src)} "
                    f"reach {dst.namespace}/{dst.name} on {port}/{protocol}",
                )
            allowed_by += ok
        return Verdict(True, "", tuple(dict.fromkeys(allowed_by)))

    def _judge(self, side: str, subject: Pod, peer: tuple[Any, ...]) -> tuple[list[Any], list[str]]:
        """The policies of ``side`` ("egress" or "ingress") that select ``subject``, and the
        names of those with a rule admitting ``peer`` (``_rule_matches``' arguments after
        the rule, its peers key and the policy)."""
        policy_type = side.capitalize()
        peers_key = "to" if side == "egress" else "from"
        isolating = [
            p for p in self.policies if policy_type in policy_types(p) and selects(p, subject)
        ]
        ok = [
            _name(p)
            for p in isolating
            if any(self._rule_matches(rule, peers_key, p, *peer) for rule in p.spec.get(side) or [])
        ]
        return isolating, ok

    def _rule_matches(
        self,
        rule: dict[str, Any],
        peers_key: str,
        policy: NetworkPolicy,
        peer_ip: str,
        peer: Pod | None,
        port: int,
        protocol: str,
        port_owner: Pod | None = None,
    ) -> bool:
        owner = port_owner if peers_key == "from" else peer
        if not _ports_match(rule.get("ports"), port, protocol, owner):
            return False
        peers = rule.get(peers_key)
        if not peers:
            return True
        return any(self._peer_matches(p, policy, peer_ip, peer) for p in peers)

    def _peer_matches(
        self, peer_rule: dict[str, Any], policy: NetworkPolicy, ip: str, pod: Pod | None
    ) -> bool:
        block = peer_rule.get("ipBlock")
        if block is not None:
            try:
                addr = ipaddress.ip_address(ip)
                if addr not in ipaddress.ip_network(block["cidr"], strict=False):
                    return False
                return not any(
                    addr in ipaddress.ip_network(e, strict=False) for e in block.get("except") or []
                )
            except (ValueError, KeyError):
                return False
        if pod is None:
            return False
        ns_selector = peer_rule.get("namespaceSelector")
        pod_selector = peer_rule.get("podSelector")
        if ns_selector is None:
            if pod.namespace != policy.namespace:
                return False
        elif not label_selector_matches(ns_selector, self.state.namespace_labels(pod.namespace)):
            return False
        return pod_selector is None or label_selector_matches(pod_selector, pod.labels)


def _ports_match(
    ports: list[dict[str, Any]] | None, port: int, protocol: str, owner: Pod | None
) -> bool:
    if not ports:
        return True
    for entry in ports:
        if (entry.get("protocol") or "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str) and not wanted.isdigit():
            if owner is not None and _named_port(owner, wanted, protocol) == port:
                return True
            continue
        low = int(wanted)
        high = int(entry.get("endPort") or low)
        if low <= port <= high:
            return True
    return False


def _named_port(pod: Pod, name: str, protocol: str) -> int | None:
    for c in pod.containers:
        for p in c.ports:
            if p.name == name and (p.protocol or "TCP") == protocol:
                return p.container_port
    return None


def _name(policy: NetworkPolicy) -> str:
    return f"{policy.namespace}/{policy.name}"


def _names(policies: list[NetworkPolicy]) -> str:
    return ", ".join(_name(p) for p in policies)


def _describe(ip: str, pod: Pod | None) -> str:
    return f"{pod.namespace}/{pod.name} ({ip})" if pod else ip
