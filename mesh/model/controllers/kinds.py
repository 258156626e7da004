"""The kind → handler table's entry type, and the kinds that are only stored.

A :class:`Kind` says what ``apply`` and ``delete`` do for one object type; the
:class:`~mesh.model.controllers.cluster.Cluster` looks objects up by type in its table.
Ingresses and NetworkPolicies are stored as given (Envoy and kube-proxy read them);
Namespaces and the cluster configuration (CNI, DNS, kube-proxy) replace what was there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh import addresses
from mesh.model.controllers.store import remove, upsert
from mesh.model.types import ClusterState, DnsConfig, Namespace, NetworkConfig, ProxyConfig


@dataclass(frozen=True)
class Kind:
    """What applying and deleting an object of one type does; each returns a change in
    words (``service/shop/web created``)."""

    apply: Callable[[Any], str]
    delete: Callable[[Any], str] | None = None
    """``None``: ``delete -f`` passes over objects of this kind."""


class StoredKind:
    """A namespaced kind kept in one list of the state, e.g. ``state.ingresses``."""

    def __init__(self, items: list[Any], short_name: str) -> None:
        self.items = items
        self.short_name = short_name

    def apply(self, obj: Any) -> str:
        return upsert(self.items, obj, self.short_name)

    def delete(self, obj: Any) -> str:
        return remove(self.items, obj, self.short_name)

    def kind(self) -> Kind:
        return Kind(self.apply, self.delete)


class ClusterConfig:
    """Namespaces and the ConfigMaps and component configs hopscope reads."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def apply_namespace(self, ns: Namespace) -> str:
        verb = "configured" if ns.name in self.namespace_names() else "created"
        self.state.namespaces = [n for n in self.state.namespaces if n.name != ns.name] + [ns]
        return f"namespace/{ns.name} {verb}"

    def namespace_names(self) -> set[str]:
        return {n.name for n in self.state.namespaces}

    def apply_dns(self, config: DnsConfig) -> str:
        self.state.dns = config
        return f"cluster DNS configured (ttl {config.ttl}s)"

    def apply_network(self, config: NetworkConfig) -> str:
        config.egress_ips = {**default_egress_ips(), **config.egress_ips}
        self.state.network = config
        return (
            f"cni configured ({config.backend} vni {config.vni}, "
            f"overlay delay {config.overlay_delay_ms:g} ms)"
        )

    def apply_proxy(self, config: ProxyConfig) -> str:
        self.state.proxy = config
        return f"kube-proxy configured (mode {config.mode}, {config.algorithm})"


def default_egress_ips() -> dict[str, str]:
    """One egress SNAT address per node, from the start of the egress pool (compose: the
    control-plane container's address on the external network, for both nodes)."""
    if addresses.PLAN == "compose":
        return {node: addresses.COMPOSE_EGRESS_IP for node in addresses.NODE_IPS}
    if addresses.PLAN == "kernel":  # a real SNAT rule to the node's own address (ip-masq)
        return dict(addresses.NODE_IPS)
    hosts = ipaddress.ip_network(addresses.EGRESS_POOL_CIDR).hosts()
    return {node: str(next(hosts)) for node in addresses.NODE_IPS}
