"""Enumerated manifest fields, checked the way the API server checks them.

The OpenAPI schemas ``kubernetes-validate`` uses describe enums only in prose (``type`` of a
Service is a plain string there), so ``type: NodePortz`` passes the schema check. This
module holds, per kind, every enumerated field hopscope reads (and the common ones of the
same objects it does not), with the values the API accepts, and refuses anything else::

    bad.yaml: Service shop/x: spec.type: 'NodePortz' is not one of ClusterIP, NodePort,
    LoadBalancer, ExternalName

A few values are valid Kubernetes but mean something hopscope's cluster cannot do; they are
refused with the reason (:data:`UNSUPPORTED`) instead of being silently ignored.

Field paths use ``[]`` for "every item of this list": ``spec.ports[].protocol``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from typing import Any

from mesh.model.types import (
    DeploymentStrategyType,
    DNSPolicy,
    IPFamily,
    IPFamilyPolicy,
    PathType,
    PodManagementPolicy,
    PolicyType,
    Protocol,
    PullPolicy,
    PVCRetentionPolicy,
    SelectorOperator,
    ServiceType,
    SessionAffinity,
    StatefulSetUpdateStrategyType,
    TaintEffect,
    TerminationMessagePolicy,
    TolerationOperator,
    TrafficPolicy,
    URIScheme,
)

Allowed = type[enum.StrEnum] | tuple[str, ...]
"""An enum class (all its values) or an explicit subset of values."""

_SELECTOR = [("matchExpressions[].operator", SelectorOperator)]

_CONTAINER: list[tuple[str, Allowed]] = [
    ("imagePullPolicy", PullPolicy),
    ("terminationMessagePolicy", TerminationMessagePolicy),
    ("ports[].protocol", Protocol),
    *(
        (f"{probe}.httpGet.scheme", URIScheme)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe")
    ),
    *((f"lifecycle.{hook}.httpGet.scheme", URIScheme) for hook in ("postStart", "preStop")),
]

_POD_SPEC: list[tuple[str, Allowed]] = [
    # A Deployment's or StatefulSet's pods always restart (the API refuses the others).
    ("restartPolicy", ("Always",)),
    ("dnsPolicy", DNSPolicy),
    ("tolerations[].operator", TolerationOperator),
    ("tolerations[].effect", TaintEffect),
    *((f"containers[].{path}", allowed) for path, allowed in _CONTAINER),
    *((f"initContainers[].{path}", allowed) for path, allowed in _CONTAINER),
    # Only init containers may set a restartPolicy, and only Always (a native sidecar).
    ("initContainers[].restartPolicy", ("Always",)),
]

_WORKLOAD: list[tuple[str, Allowed]] = [
    *((f"spec.selector.{path}", allowed) for path, allowed in _SELECTOR),
    *((f"spec.template.spec.{path}", allowed) for path, allowed in _POD_SPEC),
]

_POLICY_PEERS = [
    f"spec.{direction}[].{peers}[].{selector}.{path}"
    for direction, peers in (("ingress", "from"), ("egress", "to"))
    for selector in ("podSelector", "namespaceSelector")
    for path, _ in _SELECTOR
]

FIELDS: dict[str, list[tuple[str, Allowed]]] = {
    "Service": [
        ("spec.type", ServiceType),
        ("spec.sessionAffinity", SessionAffinity),
        ("spec.externalTrafficPolicy", TrafficPolicy),
        ("spec.internalTrafficPolicy", TrafficPolicy),
        ("spec.ipFamilyPolicy", IPFamilyPolicy),
        ("spec.ipFamilies[]", IPFamily),
        ("spec.ports[].protocol", Protocol),
    ],
    "Deployment": [("spec.strategy.type", DeploymentStrategyType), *_WORKLOAD],
    "StatefulSet": [
        ("spec.podManagementPolicy", PodManagementPolicy),
        ("spec.updateStrategy.type", StatefulSetUpdateStrategyType),
        ("spec.persistentVolumeClaimRetentionPolicy.whenDeleted", PVCRetentionPolicy),
        ("spec.persistentVolumeClaimRetentionPolicy.whenScaled", PVCRetentionPolicy),
        *_WORKLOAD,
    ],
    "Ingress": [("spec.rules[].http.paths[].pathType", PathType)],
    "NetworkPolicy": [
        ("spec.policyTypes[]", PolicyType),
        ("spec.ingress[].ports[].protocol", Protocol),
        ("spec.egress[].ports[].protocol", Protocol),
        *((f"spec.podSelector.{path}", allowed) for path, allowed in _SELECTOR),
        *((path, SelectorOperator) for path in _POLICY_PEERS),
    ],
}
"""Kind → (field path, allowed values) for every enumerated field checked at load time."""

SINGLE_STACK = "the cluster is single-stack IPv4, as the API server would answer"

UNSUPPORTED: dict[tuple[str, str, str], str] = {
    ("Service", "spec.internalTrafficPolicy", "Local"): (
        "hopscope's kube-proxy routes in-cluster traffic to endpoints on every node"
    ),
    ("Service", "spec.ipFamilyPolicy", "RequireDualStack"): SINGLE_STACK,
    ("Service", "spec.ipFamilies[]", "IPv6"): SINGLE_STACK,
    **{
        (kind, "spec.template.spec.containers[].readinessProbe.httpGet.scheme", "HTTPS"): (
            "hopscope's readiness probes speak plain HTTP"
        )
        for kind in ("Deployment", "StatefulSet")
    },
}
"""(kind, field path, value) → why hopscope refuses a value Kubernetes accepts."""

_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class EnumFieldError(ValueError):
    """One field holds a value outside its enumeration; ``field`` is its concrete path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_enum_fields(doc: dict[str, Any]) -> None:
    """Raise :class:`EnumFieldError` for the first enumerated field of ``doc`` that is wrong."""
    kind = str(doc.get("kind", ""))
    for pattern, allowed in FIELDS.get(kind, []):
        values = tuple(allowed) if isinstance(allowed, tuple) else tuple(m.value for m in allowed)
        for where, value in walk(doc, pattern):
            if value is None:
                continue  # null means "default", as in the API
            if not isinstance(value, str) or value not in values:
                raise EnumFieldError(where, f"{value!r} is not one of {', '.join(values)}")
            reason = UNSUPPORTED.get((kind, pattern, value))
            if reason:
                raise EnumFieldError(where, f"{value!r} is not supported by hopscope ({reason})")
    if kind == "Service":
        for where, value in walk(doc, "spec.ports[].appProtocol"):
            if value is not None:
                check_app_protocol(where, value)


def check_app_protocol(where: str, value: Any) -> None:
    """``appProtocol`` is free-form but must be a qualified name like a label key:
    ``http``, ``kubernetes.io/h2c``, ``example.com/my-protocol``."""
    text = value if isinstance(value, str) else ""
    prefix, _, name = text.rpartition("/")
    ok = (
        bool(name)
        and len(name) <= 63
        and bool(_QUALIFIED_NAME.match(name))
        and (not prefix or (len(prefix) <= 253 and bool(_DNS_SUBDOMAIN.match(prefix))))
        and text.count("/") <= 1
    )
    if not ok:
        raise EnumFieldError(
            where,
            f"{value!r} is not a qualified name (an IANA service name like 'http', or "
            "'kubernetes.io/h2c', or 'example.com/name')",
        )


def walk(doc: Any, pattern: str) -> Iterator[tuple[str, Any]]:
    """Every ``(concrete path, value)`` that ``pattern`` names in ``doc``; missing parts skip."""
    yield from _walk(doc, pattern.split("."), "")


def _walk(node: Any, parts: list[str], prefix: str) -> Iterator[tuple[str, Any]]:
    if not parts:
        yield prefix, node
        return
    head, rest = parts[0], parts[1:]
    each = head.endswith("[]")
    key = head[:-2] if each else head
    if not isinstance(node, dict) or key not in node:
        return
    here = f"{prefix}.{key}" if prefix else key
    child = node[key]
    if not each:
        yield from _walk(child, rest, here)
        return
    if isinstance(child, list):
        for i, item in enumerate(child):
            yield from _walk(item, rest, f"{here}[{i}]")
