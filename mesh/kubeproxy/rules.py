"""From the cluster model to proxy rules: which address:port goes to which endpoints, and how.

There is no change tracker here: each sync recomputes everything. :func:`build_rules`
turns the whole cluster state (Services, their EndpointSlices, the kube-proxy settings)
into a new, immutable :class:`RuleSet`; the proxier keeps only the latest state that
arrived while it waited (so a burst of changes costs one sync) and swaps the whole rule set
in one assignment. There is one :class:`ServiceRule` per address the kernel would match on:

* ``cluster-ip``   — ClusterIP:port (every Service with a VIP)
* ``node-port``    — nodeIP:nodePort on *each* node (NodePort and LoadBalancer Services)
* ``load-balancer``— the emulated cloud load balancer's LB-IP:port, whose "endpoints" are
  the nodes' NodePorts

:func:`decide` is the packet-flow decision for one new connection — candidate endpoints and
SNAT — written as a pure function so it can be tested table-style like kube-proxy's own
packet-flow tests. Endpoint choice among the candidates sits behind :class:`Selector`, one
implementation per proxy mode / IPVS scheduler.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh import addresses
from mesh.model.controllers import SERVED_BY_ANNOTATION
from mesh.model.types import ClusterState, ProxyConfig, Service, ServicePort


@dataclass(frozen=True)
class EndpointTarget:
    ip: str
    port: int
    pod: str
    node: str
    ready: bool
    serving: bool
    terminating: bool

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class ServiceRule:
    namespace: str
    name: str
    port_name: str | None
    vip: str
    port: int
    protocol: str
    service_type: str
    app_protocol: str | None
    endpoints: tuple[EndpointTarget, ...]
    kind: str = "cluster-ip"
    """``cluster-ip``, ``node-port`` or ``load-balancer``."""
    node: str | None = None
    """For ``node-port`` rules: the node whose IP this rule listens on."""
    session_affinity: str = "None"
    affinity_timeout: int = 10800
    external_traffic_policy: str = "Cluster"

    @property
    def key(self) -> tuple[str, int]:
        return (self.vip, self.port)

    @property
    def ready_endpoints(self) -> tuple[EndpointTarget, ...]:
        return tuple(e for e in self.endpoints if e.ready)

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}" + (f":{self.port_name}" if self.port_name else "")

    @property
    def hop(self) -> str:
        return "load-balancer" if self.kind == "load-balancer" else "kube-proxy"


@dataclass(frozen=True)
class HealthCheck:
    """``healthCheckNodePort`` of a Local LoadBalancer Service on one node."""

    namespace: str
    name: str
    node: str
    local_endpoints: int


def health_check_reply(check: HealthCheck | None) -> tuple[int, dict[str, object]]:
    """What kube-proxy answers on a health check node port: 200 with the node's local
    endpoints, 503 when it has none (a load balancer then skips the node), 404 when the
    port is no Service's."""
    if check is None:
        return 404, {"error": "no such health check"}
    body = {
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "node": check.node,
        "serviceProxyHealthy": True,
    }
    return (200 if check.local_endpoints else 503), body


@dataclass(frozen=True)
class RuleSet:
    version: int = 0
    rules: dict[tuple[str, int], ServiceRule] = field(default_factory=dict)
    health_checks: dict[tuple[str, int], HealthCheck] = field(default_factory=dict)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)


def _targets(state: ClusterState, svc: Service, sp: ServicePort) -> list[EndpointTarget]:
    targets: list[EndpointTarget] = []
    for eps in state.slices_for(svc.namespace, svc.name):
        port = next((p.port for p in eps.ports if p.name == sp.name), None)
        if not port:
            continue
        for ep in eps.endpoints:
            targets.extend(
                EndpointTarget(ip, port, ep.pod, ep.node, ep.ready, ep.serving, ep.terminating)
                for ip in ep.addresses
            )
    return targets


def build_rules(state: ClusterState, node_ips: dict[str, str] | None = None) -> RuleSet:
    """Every proxied address:port of the cluster (TCP; headless/ExternalName have none)."""
    node_ips = node_ips or {n.name: n.ip for n in state.nodes} or addresses.NODE_IPS
    rules: dict[tuple[str, int], ServiceRule] = {}
    checks: dict[tuple[str, int], HealthCheck] = {}
    for svc in state.services:
        if svc.type == "ExternalName" or svc.headless or not svc.cluster_ip:
            continue
        if SERVED_BY_ANNOTATION in svc.annotations:
            continue  # served directly by a system component (cluster DNS)
        for sp in svc.ports:
            if sp.protocol != "TCP":
                continue
            targets = tuple(_targets(state, svc, sp))

            _add(rules, _rule(svc, sp, svc.cluster_ip, sp.port, "cluster-ip", targets))
            if sp.node_port:
                for node, ip in node_ips.items():
                    _add(rules, _rule(svc, sp, ip, sp.node_port, "node-port", targets, node))
                for lb_ip in svc.load_balancer_ingress:
                    nodes = tuple(
                        EndpointTarget(
                            ip,
                            sp.node_port,
                            node,
                            node,
                            _node_serves(svc, targets, node),
                            True,
                            False,
                        )
                        for node, ip in node_ips.items()
                    )
                    _add(rules, _rule(svc, sp, lb_ip, sp.port, "load-balancer", nodes))
        if svc.health_check_node_port:
            first = svc.ports[0] if svc.ports else None
            local = _targets(state, svc, first) if first else []
            for node, ip in node_ips.items():
                count = sum(1 for t in local if t.ready and t.node == node)
                checks[(ip, svc.health_check_node_port)] = HealthCheck(
                    svc.namespace, svc.name, node, count
                )
    return RuleSet(state.resource_version, rules, checks, state.proxy)


def _rule(
    svc: Service,
    sp: ServicePort,
    vip: str,
    port: int,
    kind: str,
    endpoints: tuple[EndpointTarget, ...],
    node: str | None = None,
) -> ServiceRule:
    return ServiceRule(
        namespace=svc.namespace,
        name=svc.name,
        port_name=sp.name,
        vip=vip,
        port=port,
        protocol=sp.protocol,
        service_type=svc.type,
        app_protocol=sp.app_protocol,
        endpoints=endpoints,
        kind=kind,
        node=node,
        session_affinity=svc.session_affinity,
        affinity_timeout=svc.affinity_timeout_seconds,
        external_traffic_policy=svc.external_traffic_policy,
    )


def _add(rules: dict[tuple[str, int], ServiceRule], rule: ServiceRule) -> None:
    rules[rule.key] = rule


def _node_serves(svc: Service, targets: tuple[EndpointTarget, ...], node: str) -> bool:
    """What the cloud LB's health check sees: Local needs a ready endpoint on the node."""
    if svc.external_traffic_policy != "Local":
        return True
    return any(t.ready and t.node == node for t in targets)


# -- the per-connection decision ------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What the nat table does with a new connection."""

    candidates: tuple[EndpointTarget, ...]
    snat_ip: str | None
    """Source address after SNAT (masquerade); None keeps the client's address."""
    reason: str
    """Why the candidates are what they are, in words (for spans and rejections)."""


def decide(rule: ServiceRule, client_ip: str, node_ips: dict[str, str] | None = None) -> Decision:
    """Candidate endpoints and SNAT for a new connection from ``client_ip`` to ``rule``."""
    node_ips = node_ips or addresses.NODE_IPS
    ready = rule.ready_endpoints
    if rule.kind == "load-balancer":
        # A passthrough cloud LB: keeps the client address, sends to healthy nodes.
        return Decision(ready, None, "healthy nodes" if ready else "no healthy node")
    if rule.kind == "node-port":
        node_ip = node_ips.get(rule.node or "", None)
        if rule.external_traffic_policy == "Local":
            local = tuple(e for e in ready if e.node == rule.node)
            reason = f"externalTrafficPolicy Local: endpoints on {rule.node}"
            return Decision(local, None, reason if local else f"no local endpoint on {rule.node}")
        return Decision(ready, node_ip, "externalTrafficPolicy Cluster: SNAT to the node IP")
    return Decision(ready, None, "ClusterIP: DNAT only")


def hairpin_snat(endpoint: EndpointTarget, client_ip: str, node_ips: dict[str, str]) -> str | None:
    """A pod reaching itself through its Service is masqueraded to its node's address."""
    if endpoint.ip == client_ip:
        return node_ips.get(endpoint.node)
    return None


# -- endpoint choice ------------------------------------------------------------------------


class Selector:
    """Chooses among candidate endpoints; one implementation per proxy mode / scheduler."""

    mode = "none"
    algorithm = "none"

    def pick(
        self, rule: ServiceRule, candidates: tuple[EndpointTarget, ...], client_ip: str
    ) -> EndpointTarget | None:
        raise NotImplementedError

    def choose(self, rule: ServiceRule, client_ip: str) -> EndpointTarget | None:
        """Pick among the rule's ready endpoints (ClusterIP semantics)."""
        return self.pick(rule, rule.ready_endpoints, client_ip)


class IptablesRandom(Selector):
    """iptables mode: a chain of ``statistic --mode random`` rules.

    For n endpoints, rule i (0-based) matches with probability 1/(n-i); the last one
    always matches. That is exactly how kube-proxy writes its KUBE-SVC chains, and gives
    every endpoint the same overall chance 1/n.
    """

    mode = "iptables"
    algorithm = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    @staticmethod
    def probabilities(n: int) -> list[float]:
        """The per-rule match probabilities kube-proxy writes for n endpoints."""
        return [1.0 / (n - i) for i in range(n)]

    def pick(
        self, rule: ServiceRule, candidates: tuple[EndpointTarget, ...], client_ip: str
    ) -> EndpointTarget | None:
        for endpoint, probability in zip(
            candidates, self.probabilities(len(candidates)), strict=True
        ):
            if probability >= 1.0 or self.rng.random() < probability:
                return endpoint
        return None


class IpvsRoundRobin(Selector):
    """ipvs ``rr``: each new connection goes to the next endpoint in turn."""

    mode = "ipvs"
    algorithm = "rr"

    def __init__(self) -> None:
        self.next: dict[tuple[str, int], int] = {}

    def pick(
        self, rule: ServiceRule, candidates: tuple[EndpointTarget, ...], client_ip: str
    ) -> EndpointTarget | None:
        if not candidates:
            return None
        i = self.next.get(rule.key, 0) % len(candidates)
        self.next[rule.key] = i + 1
        return candidates[i]


class IpvsLeastConnection(Selector):
    """ipvs ``lc``: the endpoint with the fewest active connections (ties: first listed)."""

    mode = "ipvs"
    algorithm = "lc"

    def __init__(self, active: Callable[[str], int]) -> None:
        self.active = active

    def pick(
        self, rule: ServiceRule, candidates: tuple[EndpointTarget, ...], client_ip: str
    ) -> EndpointTarget | None:
        if not candidates:
            return None
        return min(candidates, key=lambda e: self.active(e.address))


class IpvsSourceHash(Selector):
    """ipvs ``sh``: the client address hashes to an endpoint (stable while the set is)."""

    mode = "ipvs"
    algorithm = "sh"

    def pick(
        self, rule: ServiceRule, candidates: tuple[EndpointTarget, ...], client_ip: str
    ) -> EndpointTarget | None:
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda e: e.address)
        return ordered[zlib.crc32(client_ip.encode()) % len(ordered)]


def make_selector(config: ProxyConfig, active: Callable[[str], int]) -> Selector:
    if config.mode == "ipvs":
        if config.scheduler == "lc":
            return IpvsLeastConnection(active)
        if config.scheduler == "sh":
            return IpvsSourceHash()
        return IpvsRoundRobin()
    return IptablesRandom()
