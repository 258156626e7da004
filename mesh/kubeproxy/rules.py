"""From the cluster model to proxy rules: which VIP:port goes to which endpoints, and how.

This is the emulator's "change tracker → sync" step, shaped like kube-proxy's
``pkg/proxy``: :func:`build_rules` turns Services and EndpointSlices into an immutable
:class:`RuleSet` (one :class:`ServiceRule` per ``VIP:port``), and the proxier swaps the whole
rule set atomically. Endpoint choice lives behind :class:`Selector`, one per proxy mode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mesh.model.controllers import SERVED_BY_ANNOTATION
from mesh.model.types import ClusterState


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

    @property
    def key(self) -> tuple[str, int]:
        return (self.vip, self.port)

    @property
    def ready_endpoints(self) -> tuple[EndpointTarget, ...]:
        return tuple(e for e in self.endpoints if e.ready)

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}" + (f":{self.port_name}" if self.port_name else "")


@dataclass(frozen=True)
class RuleSet:
    version: int = 0
    rules: dict[tuple[str, int], ServiceRule] = field(default_factory=dict)


def build_rules(state: ClusterState) -> RuleSet:
    """Every proxied ``VIP:port`` of the cluster (TCP; headless/ExternalName have none)."""
    rules: dict[tuple[str, int], ServiceRule] = {}
    for svc in state.services:
        if svc.type == "ExternalName" or svc.headless or not svc.cluster_ip:
            continue
        if SERVED_BY_ANNOTATION in svc.annotations:
            continue  # served directly by a system component (cluster DNS)
        slices = state.slices_for(svc.namespace, svc.name)
        for sp in svc.ports:
            if sp.protocol != "TCP":
                continue
            targets: list[EndpointTarget] = []
            for eps in slices:
                port = next((p.port for p in eps.ports if p.name == sp.name), None)
                if not port:
                    continue
                for ep in eps.endpoints:
                    targets.extend(
                        EndpointTarget(
                            ip, port, ep.pod, ep.node, ep.ready, ep.serving, ep.terminating
                        )
                        for ip in ep.addresses
                    )
            rule = ServiceRule(
                namespace=svc.namespace,
                name=svc.name,
                port_name=sp.name,
                vip=svc.cluster_ip,
                port=sp.port,
                protocol=sp.protocol,
                service_type=svc.type,
                app_protocol=sp.app_protocol,
                endpoints=tuple(targets),
            )
            rules[rule.key] = rule
    return RuleSet(state.resource_version, rules)


class Selector:
    """Chooses the endpoint for a new connection; one implementation per proxy mode."""

    mode = "none"
    algorithm = "none"

    def choose(self, rule: ServiceRule, client_ip: str) -> EndpointTarget | None:
        raise NotImplementedError


class IptablesRandom(Selector):
    """iptables mode: a chain of ``statistic --mode random`` rules.

    For n ready endpoints, rule i (0-based) matches with probability 1/(n-i); the last one
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

    def choose(self, rule: ServiceRule, client_ip: str) -> EndpointTarget | None:
        ready = rule.ready_endpoints
        for endpoint, probability in zip(ready, self.probabilities(len(ready)), strict=True):
            if probability >= 1.0 or self.rng.random() < probability:
                return endpoint
        return None
