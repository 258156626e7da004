"""Which routes attach where, as a Gateway API controller would write into ``status``.

* :func:`gateway_attachments` — the routes each listener of a Gateway accepts: ``parentRefs``
  with ``sectionName`` and ``port``, the listener/route hostname intersection, and
  ``allowedRoutes`` (namespaces ``Same``/``All``/``Selector``, kinds);
* :func:`service_routes` — HTTPRoutes/GRPCRoutes bound to a Service the GAMMA way
  (``parentRefs: [{group: "", kind: Service}]``), producer and consumer routes;
* :func:`route_problems` — what a user wants told: a parent that does not exist or does not
  accept the route, a backend Service that does not exist (its share of the rule answers 500,
  as the API requires for invalid ``backendRefs``), a Gateway of another class.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.model.gateway_views import (
    BackendRef,
    GatewayView,
    Listener,
    ParentRef,
    RouteView,
    all_routes,
    gateway_view,
)
from mesh.model.types import ClusterState, Gateway

GATEWAY_CLASS = "hopscope"
"""``spec.gatewayClassName`` of the Gateways hopscope's ingress serves."""


@dataclass(frozen=True)
class Attachment:
    """A route accepted by one listener of a Gateway, with the hostnames it serves there."""

    gateway: GatewayView
    listener: Listener
    route: RouteView
    hostnames: tuple[str, ...]
    """The listener/route hostname intersection; ``("*",)`` when neither names one."""


def _host_matches(pattern: str, host: str) -> bool:
    """Does wildcard-or-exact ``pattern`` cover ``host`` (itself exact or a wildcard)?"""
    if not pattern.startswith("*."):
        return pattern == host
    suffix = pattern[1:]  # ".example.com": one label or more before it
    candidate = host[1:] if host.startswith("*.") else host
    return candidate.endswith(suffix)


def intersect_hostnames(listener: str | None, route: tuple[str, ...]) -> tuple[str, ...]:
    """The hostnames a route serves on a listener (empty: none, so not accepted)."""
    if listener is None:
        return route or ("*",)
    if not route:
        return (listener,)
    out = []
    for host in route:
        if _host_matches(listener, host):
            out.append(host)
        elif _host_matches(host, listener):
            out.append(listener)
    return tuple(dict.fromkeys(out))


def _namespace_allowed(state: ClusterState, gw: GatewayView, ls: Listener, ns: str) -> bool:
    if ls.routes_from == "All":
        return True
    if ls.routes_from == "Same":
        return ns == gw.namespace
    labels = state.namespace_labels(ns)
    selector = ls.routes_selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        has, value = expr["key"] in labels, labels.get(expr["key"])
        op, values = expr["operator"], expr.get("values") or []
        ok = {
            "In": has and value in values,
            "NotIn": not has or value not in values,
            "Exists": has,
            "DoesNotExist": not has,
        }[op]
        if not ok:
            return False
    return True


def _listener_accepts(
    state: ClusterState, gw: GatewayView, ls: Listener, route: RouteView, parent: ParentRef
) -> tuple[str, ...]:
    if parent.section_name is not None and parent.section_name != ls.name:
        return ()
    if parent.port is not None and parent.port != ls.port:
        return ()
    if not ls.allows_kind(route.kind) or not _namespace_allowed(state, gw, ls, route.namespace):
        return ()
    return intersect_hostnames(ls.hostname, route.hostnames)


def gateway_attachments(state: ClusterState, gw: Gateway) -> list[Attachment]:
    """The routes each listener of ``gw`` accepts, in the API's precedence order of routes."""
    view = gateway_view(gw)
    out: list[Attachment] = []
    for route in all_routes(state):
        for parent in route.parents:
            if parent.is_service or (parent.namespace, parent.name) != (gw.namespace, gw.name):
                continue
            for ls in view.listeners:
                hosts = _listener_accepts(state, view, ls, route, parent)
                if hosts:
                    out.append(Attachment(view, ls, route, hosts))
    return out


def service_routes(
    state: ClusterState, namespace: str, service: str, port: int, caller_namespace: str
) -> list[RouteView]:
    """HTTPRoutes and GRPCRoutes bound to Service ``namespace/service`` (GAMMA) that apply to
    a caller in ``caller_namespace`` for traffic to ``port``.

    A route in the Service's own namespace (a *producer* route) applies to every caller; a
    route in the caller's namespace (a *consumer* route) applies to that namespace's callers
    only, and when one exists it replaces the producer routes for them, as GAMMA specifies.
    """
    producer, consumer = [], []
    for route in all_routes(state):
        if route.kind == "TLSRoute":
            continue
        for parent in route.parents:
            if not parent.is_service or (parent.namespace, parent.name) != (namespace, service):
                continue
            if parent.port is not None and parent.port != port:
                continue
            if route.namespace == namespace:
                producer.append(route)
            elif route.namespace == caller_namespace:
                consumer.append(route)
            break
    return consumer or producer


def backend_services(route: RouteView) -> list[tuple[str, str, int]]:
    """``(namespace, Service, port)`` of every backend and mirror of ``route``, in order."""
    seen: dict[tuple[str, str, int], None] = {}
    for rule in route.rules:
        for ref in (*rule.backends, *(m.backend for m in rule.mirrors)):
            seen[(ref.namespace, ref.name, ref.port)] = None
    return list(seen)


def backend_problem(state: ClusterState, ref: BackendRef) -> str | None:
    """Why ``ref`` cannot be used (the API calls it invalid), or None."""
    svc = state.service(ref.namespace, ref.name)
    if svc is None:
        return f"Service {ref.namespace}/{ref.name} not found"
    if not any(sp.port == ref.port for sp in svc.ports):
        return f"Service {ref.namespace}/{ref.name} has no port {ref.port}"
    if not svc.cluster_ip or svc.headless:
        return f"Service {ref.namespace}/{ref.name} has no cluster IP"
    return None


def route_problems(state: ClusterState) -> list[str]:
    """What a controller would report in the routes' and Gateways' status, one line each."""
    problems: list[str] = []
    gateways = {(g.namespace, g.name): g for g in state.gateways}
    for route in all_routes(state):
        attached = False
        for i, parent in enumerate(route.parents):
            if parent.is_service:
                svc = state.service(parent.namespace, parent.name)
                attached = attached or svc is not None
                if svc is None:
                    problems.append(
                        f"{route.label}: spec.parentRefs[{i}]: Service "
                        f"{parent.namespace}/{parent.name} not found (route not attached)"
                    )
                continue
            gw = gateways.get((parent.namespace, parent.name))
            if gw is None:
                problems.append(
                    f"{route.label}: spec.parentRefs[{i}]: Gateway "
                    f"{parent.namespace}/{parent.name} not found (route not attached)"
                )
                continue
            if any(a.route == route for a in gateway_attachments(state, gw)):
                attached = True
            else:
                problems.append(
                    f"{route.label}: spec.parentRefs[{i}]: no listener of Gateway "
                    f"{parent.namespace}/{parent.name} accepts it (sectionName, port, "
                    "hostnames or allowedRoutes)"
                )
        if not route.parents:
            problems.append(f"{route.label}: spec.parentRefs: empty (route not attached)")
        if not attached and route.parents:
            continue
        for rule in route.rules:
            for ref in rule.backends:
                why = backend_problem(state, ref)
                if why:
                    problems.append(
                        f"{route.label}: {ref.where}: {why} (its share of the rule answers 500)"
                    )
            for mirror in rule.mirrors:
                why = backend_problem(state, mirror.backend)
                if why:
                    problems.append(
                        f"{route.label}: {mirror.backend.where}: {why} (nothing is mirrored)"
                    )
    for gw in state.gateways:
        if gw.spec.get("gatewayClassName") != GATEWAY_CLASS:
            problems.append(
                f"Gateway {gw.namespace}/{gw.name}: spec.gatewayClassName: "
                f"{gw.spec.get('gatewayClassName')!r} is not {GATEWAY_CLASS!r} (not served)"
            )
    return problems
