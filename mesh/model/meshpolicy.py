"""The mesh's policies: which connections a sidecar accepts, and how callers reach a Service.

Two kinds, shaped like Istio's so what a user learns carries over:

``PeerAuthentication`` (``security.istio.io/v1``) sets the mTLS mode of the workloads it
selects — ``STRICT`` (mTLS only), ``PERMISSIVE`` (mTLS and plaintext), ``DISABLE``
(plaintext only); ``UNSET`` inherits. Precedence, as in Istio: a policy with a selector in
the pod's namespace, then the namespace's policy without a selector, then the mesh-wide
policy in the root namespace (``hopscope-system``), then hopscope's default. Among policies
of one level the oldest wins. ``portLevelMtls`` overrides the mode per container port.

hopscope's default (no policy at all) is ``DISABLE``: out of the box every hop stays
plaintext, so kube-proxy and the overlay can read each request (Istio's default is
``PERMISSIVE`` with automatic mTLS). Apply a mesh-wide policy to turn mTLS on.

``DestinationRule`` (``networking.istio.io/v1``) is the caller's side for one Service:
``trafficPolicy.tls.mode`` (``ISTIO_MUTUAL`` or ``DISABLE``) overrides automatic mTLS, and
``connectionPool`` sets the circuit breaker of the callers' clusters and how long their
connections live (``tcp.connectTimeout``, ``tcp.maxConnectionDuration``,
``http.maxRequestsPerConnection``, ``http.idleTimeout``). Without a rule the
caller's sidecar originates mTLS exactly when the Service's workloads run a sidecar and
accept it (mode not ``DISABLE``) — Istio's automatic mTLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh.model.types import (
    ClusterState,
    DestinationRule,
    PeerAuthentication,
    Pod,
    Service,
    Workload,
)

MESH_ROOT_NAMESPACE = "hopscope-system"
"""Where a ``PeerAuthentication`` without a selector applies to the whole mesh."""

DEFAULT_MODE = "DISABLE"
"""The mode when no policy applies (see the module docstring)."""

MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
TRUST_DOMAIN = "cluster.local"

_MODE = {"type": "object", "additionalProperties": False, "properties": {"mode": {"enum": MODES}}}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}

PEER_AUTHENTICATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "selector": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"matchLabels": _LABELS},
        },
        "mtls": _MODE,
        "portLevelMtls": {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,5}$"},
            "additionalProperties": _MODE,
        },
    },
}

DESTINATION_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["host"],
    "properties": {
        "host": {"type": "string", "minLength": 1},
        "trafficPolicy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "tls": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"mode": {"enum": ["DISABLE", "ISTIO_MUTUAL"]}},
                },
                "outlierDetection": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "consecutive5xxErrors": _COUNT,
                        "consecutiveGatewayErrors": _COUNT,
                        "interval": _DURATION,
                        "baseEjectionTime": _DURATION,
                        "maxEjectionPercent": {"type": "integer", "minimum": 0, "maximum": 100},
                    },
                },
                "connectionPool": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "tcp": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "maxConnections": _COUNT,
                                "connectTimeout": _DURATION,
                                "maxConnectionDuration": _DURATION,
                            },
                        },
                        "http": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "http1MaxPendingRequests": _COUNT,
                                "http2MaxRequests": _COUNT,
                                "maxRetries": _COUNT,
                                "maxRequestsPerConnection": {
                                    "type": "integer",
                                    "minimum": 0,
                                    "maximum": 2**29,
                                },
                                "idleTimeout": _DURATION,
                            },
                        },
                    },
                },
            },
        },
    },
}


def check_peer_auth(spec: dict[str, Any]) -> list[tuple[str, str]]:
    if spec.get("portLevelMtls") and not (spec.get("selector") or {}).get("matchLabels"):
        return [("spec.portLevelMtls", "needs spec.selector (port numbers are per workload)")]
    return []


def check_destination_rule(spec: dict[str, Any]) -> list[tuple[str, str]]:
    host = spec["host"]
    if "*" in host:
        return [("spec.host", "wildcard hosts are not supported: name one Service")]
    return []


@dataclass(frozen=True)
class MtlsMode:
    """A workload port's effective mode and the policy it came from."""

    mode: str
    """``STRICT``, ``PERMISSIVE`` or ``DISABLE``."""
    policy: str
    """``PeerAuthentication shop/default``, or ``hopscope default`` when none applies."""
    namespace: str
    """The namespace of the policy (the mesh root for a mesh-wide one)."""

    @property
    def accepts_mtls(self) -> bool:
        return self.mode != "DISABLE"

    @property
    def accepts_plaintext(self) -> bool:
        return self.mode != "STRICT"


def _selects(policy: PeerAuthentication, labels: dict[str, str]) -> bool:
    wanted = (policy.spec.get("selector") or {}).get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def mtls_mode(state: ClusterState, namespace: str, labels: dict[str, str], port: int) -> MtlsMode:
    """The effective mode of a workload's port (``labels``: the pod's or its template's)."""
    by_age = sorted(state.peer_authentications, key=lambda p: (p.created, p.name))
    workload = [
        p
        for p in by_age
        if p.namespace == namespace and p.spec.get("selector") and _selects(p, labels)
    ]
    in_namespace = [p for p in by_age if p.namespace == namespace and not p.spec.get("selector")]
    mesh = [p for p in by_age if p.namespace == MESH_ROOT_NAMESPACE and not p.spec.get("selector")]
    for level in (workload, in_namespace, mesh):
        if not level:
            continue
        policy = level[0]
        port_mode = ((policy.spec.get("portLevelMtls") or {}).get(str(port)) or {}).get("mode")
        mode = port_mode or (policy.spec.get("mtls") or {}).get("mode") or "UNSET"
        if mode != "UNSET":
            return MtlsMode(
                mode, f"PeerAuthentication {policy.namespace}/{policy.name}", policy.namespace
            )
    return MtlsMode(DEFAULT_MODE, "hopscope default", MESH_ROOT_NAMESPACE)


def pod_mtls_mode(state: ClusterState, pod: Pod, port: int) -> MtlsMode:
    return mtls_mode(state, pod.namespace, pod.labels, port)


def destination_rule(state: ClusterState, svc: Service, caller_ns: str) -> DestinationRule | None:
    """The rule for ``svc`` a caller in ``caller_ns`` follows: its own namespace's first,
    then the Service's namespace's, then the mesh root's (oldest first within each)."""
    names = {
        svc.name,
        f"{svc.name}.{svc.namespace}",
        f"{svc.name}.{svc.namespace}.svc",
        f"{svc.name}.{svc.namespace}.svc.{TRUST_DOMAIN}",
    }
    by_age = sorted(state.destination_rules, key=lambda r: (r.created, r.name))
    for namespace in (caller_ns, svc.namespace, MESH_ROOT_NAMESPACE):
        for rule in by_age:
            host = rule.spec["host"]
            short = "." not in host
            if rule.namespace != namespace:
                continue
            if host in names and (not short or rule.namespace == svc.namespace):
                return rule
    return None


@dataclass(frozen=True)
class Upstream:
    """How a caller's sidecar reaches one Service port."""

    mtls: bool
    """Originate mTLS (else plaintext)."""
    peer: MtlsMode | None
    """What the Service's workloads accept on that port (None: no workload behind it)."""
    identities: list[str]
    """SPIFFE IDs the Service's workloads present (their service accounts)."""
    reason: str
    """Why mTLS or plaintext: ``automatic mTLS``, ``DestinationRule shop/catalog``, …"""
    rule: DestinationRule | None


def upstream(
    state: ClusterState,
    svc: Service,
    target_port: int,
    caller_ns: str,
    pod: Pod | None = None,
) -> Upstream:
    """Automatic mTLS unless a DestinationRule says otherwise (see the module docstring):
    to the Service's workloads, or to one ``pod`` of it (a headless Service's)."""
    if pod is not None:
        backends = [(pod.namespace, pod.labels, pod.has_sidecar, pod.service_account)]
    else:
        backends = [
            (w.namespace, w.template.labels, w.template.has_sidecar, w.template.service_account)
            for w in service_workloads(state, svc)
        ]
    peer: MtlsMode | None = None
    identities: set[str] = set()
    with_sidecar = bool(backends)
    for namespace, labels, has_sidecar, account in backends:
        mode = mtls_mode(state, namespace, labels, target_port)
        # The strictest mode of the backends decides what the callers must do.
        if peer is None or _STRICTNESS[mode.mode] > _STRICTNESS[peer.mode]:
            peer = mode
        with_sidecar = with_sidecar and has_sidecar
        identities.add(spiffe_id(namespace, account))
    rule = destination_rule(state, svc, caller_ns)
    policy = (rule.spec.get("trafficPolicy") or {}) if rule is not None else {}
    tls_mode = (policy.get("tls") or {}).get("mode")
    if rule is not None and tls_mode is not None:
        reason = f"DestinationRule {rule.namespace}/{rule.name} tls.mode {tls_mode}"
        return Upstream(tls_mode == "ISTIO_MUTUAL", peer, sorted(identities), reason, rule)
    auto = with_sidecar and peer is not None and peer.accepts_mtls
    reason = "automatic mTLS" if auto else "plaintext (the callee takes no mTLS)"
    if not with_sidecar:
        reason = "plaintext (the callee has no sidecar)"
    return Upstream(auto, peer, sorted(identities), reason, rule)


def service_workloads(state: ClusterState, svc: Service) -> list[Workload]:
    """The Deployments and StatefulSets whose pod template the Service selects."""
    if not svc.selector:
        return []
    return [
        w
        for w in state.workloads
        if w.namespace == svc.namespace
        and all(w.template.labels.get(k) == v for k, v in svc.selector.items())
    ]


_STRICTNESS = {"DISABLE": 0, "PERMISSIVE": 1, "STRICT": 2}


def spiffe_id(namespace: str, service_account: str | None) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account or 'default'}"
