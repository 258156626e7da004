"""The renderer seam: from the proxy's rule set to one document a restore command loads.

The userspace proxier keeps one :class:`~mesh.kubeproxy.rules.ServiceRule` per address the
kernel would match on (ClusterIP, each node's NodePort, each LoadBalancer IP). Netfilter
backends think per *Service port* instead, the way kube-proxy's own ``ServicePortMap`` does,
so :func:`service_ports` regroups the rule set into :class:`ServicePortView` objects and
sorts each one's endpoints into the sets kube-proxy's ``CategorizeEndpoints`` yields for a
node: the endpoints ``Cluster`` policy uses, the node's own endpoints for ``Local`` policy,
and whether the Service has a usable endpoint anywhere at all.

A backend implements :class:`RuleRenderer`. :meth:`RuleRenderer.setup` is loaded once into a
fresh node namespace (the jumps from the built-in chains); :meth:`RuleRenderer.render` is
loaded on every sync and replaces the backend's own chains as a whole, so a sync is atomic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from mesh.kubeproxy.rules import EndpointTarget, HealthCheck, RuleSet, ServiceRule


@dataclass(frozen=True)
class ProxyNode:
    """The node a document is rendered for (kube-proxy's ``--hostname-override`` & co)."""

    name: str
    """Endpoints on this node are the *local* ones (``externalTrafficPolicy: Local``)."""
    cluster_cidr: str | None = None
    """kube-proxy's ``--cluster-cidr`` (``detectLocalMode: ClusterCIDR``): sources inside it
    are pods. ``None`` renders no local-traffic rules, like a kube-proxy without a detector."""
    drop_log_group: int | None = None
    """An NFLOG group that also gets each packet dropped for having no local endpoint (a
    hopscope addition: the trace can then name the drop; kube-proxy itself only drops)."""
    masquerade_bit: int = 14
    """``iptables.masqueradeBit``: the packet-mark bit that asks KUBE-POSTROUTING to SNAT."""

    @property
    def masquerade_mark(self) -> str:
        return hex(1 << self.masquerade_bit)


@dataclass(frozen=True)
class ServicePortView:
    """One Service port as netfilter backends see it, endpoints already categorized."""

    name: str
    """kube-proxy's ``ServicePortName`` string: ``namespace/name`` plus ``:port`` if named."""
    protocol: str
    """Lower case, as kube-proxy hashes and matches it (``tcp``)."""
    cluster_ip: str
    port: int
    node_port: int | None
    load_balancer_ips: tuple[str, ...]
    health_check_node_port: int | None
    affinity_seconds: int | None
    """``sessionAffinityConfig.clientIP.timeoutSeconds`` when affinity is ClientIP."""
    external_policy_local: bool
    """``externalTrafficPolicy: Local`` on a Service reachable from outside."""
    cluster_endpoints: tuple[EndpointTarget, ...]
    """What ``Cluster`` policy balances over: ready endpoints, else serving+terminating."""
    local_endpoints: tuple[EndpointTarget, ...]
    """What ``Local`` policy balances over on this node (empty unless it is in use)."""
    has_endpoints: bool
    """A usable endpoint exists somewhere in the cluster (no REJECT then)."""

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.load_balancer_ips)

    @property
    def reachable_endpoints(self) -> tuple[EndpointTarget, ...]:
        """Every endpoint this node may DNAT to: one KUBE-SEP chain each."""
        merged = {e.address: e for e in (*self.cluster_endpoints, *self.local_endpoints)}
        return tuple(merged[a] for a in sorted(merged))


class RuleRenderer(Protocol):
    """A netfilter backend for the kernel data path (iptables now, nftables later)."""

    backend: str
    """``iptables`` or ``nftables``: what ``hopscope`` prints as the proxy mode."""
    restore_argv: tuple[str, ...]
    """The command that loads a document from stdin, atomically."""

    def setup(self, node: ProxyNode) -> str:
        """The document loaded once into a fresh node namespace (hooks into the kernel)."""
        ...

    def render(self, rules: RuleSet, node: ProxyNode) -> str:
        """The whole proxy state for ``node``; loading it replaces the previous sync's."""
        ...

    def delete_stale(self, document: str, previous: str) -> str:
        """``document`` plus whatever removes the chains ``previous`` had and it has not
        (a Service or endpoint gone since the last sync), still one atomic load."""
        ...


def service_ports(rules: RuleSet, node: ProxyNode) -> list[ServicePortView]:
    """The rule set regrouped per Service port, sorted by name (deterministic output)."""
    groups: dict[tuple[str, str, str | None], list[ServiceRule]] = {}
    for rule in rules.rules.values():
        if rule.protocol.upper() != "TCP":
            continue
        groups.setdefault((rule.namespace, rule.name, rule.port_name), []).append(rule)
    checks = _health_check_ports(rules.health_checks)
    views = [_view(group, checks, node) for group in groups.values()]
    return sorted((v for v in views if v is not None), key=lambda v: v.name)


def _health_check_ports(checks: dict[tuple[str, int], HealthCheck]) -> dict[str, int]:
    return {f"{c.namespace}/{c.name}": port for (_, port), c in sorted(checks.items())}


def _view(
    group: list[ServiceRule], checks: dict[str, int], node: ProxyNode
) -> ServicePortView | None:
    cluster = next((r for r in group if r.kind == "cluster-ip"), None)
    if cluster is None:
        return None
    node_port = next((r.port for r in group if r.kind == "node-port"), None)
    lb_ips = tuple(dict.fromkeys(r.vip for r in group if r.kind == "load-balancer"))
    external_local = cluster.external_traffic_policy == "Local" and bool(node_port or lb_ips)
    cluster_eps, local_eps, has_any = categorize(cluster.endpoints, node.name, external_local)
    return ServicePortView(
        name=cluster.service,
        protocol=cluster.protocol.lower(),
        cluster_ip=cluster.vip,
        port=cluster.port,
        node_port=node_port,
        load_balancer_ips=lb_ips,
        health_check_node_port=checks.get(f"{cluster.namespace}/{cluster.name}"),
        affinity_seconds=(
            cluster.affinity_timeout if cluster.session_affinity == "ClientIP" else None
        ),
        external_policy_local=external_local,
        cluster_endpoints=cluster_eps,
        local_endpoints=local_eps,
        has_endpoints=has_any,
    )


def categorize(
    endpoints: Iterable[EndpointTarget], node: str, uses_local: bool
) -> tuple[tuple[EndpointTarget, ...], tuple[EndpointTarget, ...], bool]:
    """(cluster endpoints, local endpoints, has any endpoint), as kube-proxy sorts them.

    Ready endpoints are used; only when none is ready do serving endpoints that are
    terminating take over (separately for the cluster-wide and the node-local set).
    Endpoints are ordered by ``ip:port`` as a string, like kube-proxy's endpoints map.
    """
    ordered = sorted(endpoints, key=lambda e: e.address)
    cluster = _usable(ordered)
    local = _usable([e for e in ordered if e.node == node]) if uses_local else ()
    return cluster, local, bool(cluster)


def _usable(endpoints: list[EndpointTarget]) -> tuple[EndpointTarget, ...]:
    ready = tuple(e for e in endpoints if e.ready)
    return ready or tuple(e for e in endpoints if e.serving and e.terminating)
