"""Gateway API routes as Envoy routes: on the ingress gateway, and in callers' sidecars (GAMMA).

:func:`gateway_resources` renders the HTTP(S) listeners of every Gateway of class
``hopscope`` into virtual hosts and clusters for the ingress Envoy, merged next to the
Ingress ones by :func:`merge_virtual_hosts`. :func:`mesh_routes` renders the routes bound to
a Service (``parentRefs: [{kind: Service}]``) for one caller's sidecar. Both translate each
rule with :func:`mesh.envoy.gateway_rules.rule_routes` and order matches by the API's
precedence.

With ``spawn_upstream_span`` (the ingress) each upstream attempt is its own CLIENT span, so
a retried request shows every try; a timeout shows as ``UT``. Each Envoy route carries the
span tag ``hopscope.route`` (``HTTPRoute shop/catalog-canary``) naming the route that decided.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mesh import addresses
from mesh.envoy.common import static_cluster
from mesh.envoy.connection_pool import connection_pool
from mesh.envoy.gateway_rules import (
    DEFAULT_ROUTE_TIMEOUT,
    ROUTE_TAG,
    ClusterOf,
    fail_response,
    ordered,
    rule_routes,
    span_tags,
)
from mesh.model.gateway_api import (
    GATEWAY_CLASS,
    Attachment,
    BackendRef,
    Match,
    RouteView,
    Rule,
    all_routes,
    backend_problem,
    backend_services,
    gateway_attachments,
    service_routes,
)
from mesh.model.meshpolicy import MESH_ROOT_NAMESPACE, destination_rule
from mesh.model.types import ClusterState, Service

__all__ = [
    "DEFAULT_ROUTE_TIMEOUT",
    "ROUTE_TAG",
    "gateway_resources",
    "merge_virtual_hosts",
    "mesh_backend_services",
    "mesh_outbound_routes",
    "mesh_routes",
    "passthrough_attachments",
    "rule_routes",
]

# -- the ingress gateway ----------------------------------------------------------------------


def gateway_cluster_name(ref: BackendRef) -> str:
    return f"gateway|{ref.namespace}|{ref.name}|{ref.port}"


def _gateway_cluster(state: ClusterState, ref: BackendRef, grpc: bool) -> dict[str, Any] | None:
    if backend_problem(state, ref) is not None:
        return None
    svc = state.service(ref.namespace, ref.name)
    assert svc is not None and svc.cluster_ip
    grpc = grpc or any(sp.port == ref.port and sp.app_protocol == "grpc" for sp in svc.ports)
    cluster = static_cluster(
        gateway_cluster_name(ref),
        svc.cluster_ip,
        ref.port,
        http2=grpc,
        one_request_per_connection=True,
        bind_ip=addresses.INGRESS_SOURCE_IP,
    )
    connection_pool(cluster, destination_rule(state, svc, MESH_ROOT_NAMESPACE))
    return cluster


def http_attachments(
    state: ClusterState, protocols: tuple[str, ...] = ("HTTP", "HTTPS")
) -> list[Attachment]:
    """HTTPRoutes and GRPCRoutes accepted by the ``protocols`` listeners of hopscope's
    Gateways."""
    out = []
    for gw in sorted(state.gateways, key=lambda g: (g.created, g.namespace, g.name)):
        if gw.spec.get("gatewayClassName") != GATEWAY_CLASS:
            continue
        out += [
            a
            for a in gateway_attachments(state, gw)
            if a.listener.protocol in protocols and a.route.kind in ("HTTPRoute", "GRPCRoute")
        ]
    return out


def passthrough_attachments(state: ClusterState) -> list[Attachment]:
    """TLSRoutes accepted by ``TLS`` listeners in ``Passthrough`` mode: the SNI hostnames
    (``Attachment.hostnames``) whose connections go, unopened, to the route's backends."""
    out = []
    for gw in state.gateways:
        if gw.spec.get("gatewayClassName") != GATEWAY_CLASS:
            continue
        out += [
            a
            for a in gateway_attachments(state, gw)
            if a.listener.protocol == "TLS"
            and a.listener.tls_mode == "Passthrough"
            and a.route.kind == "TLSRoute"
        ]
    return out


def gateway_resources(
    state: ClusterState, protocols: tuple[str, ...] = ("HTTP", "HTTPS")
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Virtual hosts (one per hostname, named ``gateway|<host>``) and clusters
    (``gateway|<ns>|<svc>|<port>``) of the routes attached to the ``protocols`` listeners of
    every Gateway of class ``hopscope``. Every listener is served on the ingress Envoy's one
    listener: a Gateway listener's port selects routes (``parentRefs[].port``), it does not
    open a socket."""
    clusters: dict[str, dict[str, Any]] = {}
    hosts: dict[str, list[tuple[RouteView, Rule, Match, int]]] = {}
    for att in http_attachments(state, protocols):
        for rule in att.route.rules:
            for i, match in enumerate(rule.matches):
                for host in att.hostnames:
                    hosts.setdefault(host, []).append((att.route, rule, match, i))

    def cluster_of_for(grpc: bool) -> ClusterOf:
        def cluster_of(ref: BackendRef) -> str | None:
            cluster = _gateway_cluster(state, ref, grpc)
            if cluster is None:
                return None
            clusters[cluster["name"]] = cluster
            return str(cluster["name"])

        return cluster_of

    vhosts = []
    for host in sorted(hosts, key=lambda h: (h == "*", h.startswith("*."), h)):
        routes: list[dict[str, Any]] = []
        for route, rule, match, _ in ordered(hosts[host]):
            shown = "" if host == "*" else host
            operation = f"gateway {route.namespace}/{route.name} {shown}{match.path}"
            grpc = route.kind == "GRPCRoute"
            routes += rule_routes(route, rule, match, cluster_of_for(grpc), operation)
        domains = ["*"] if host == "*" else [host, f"{host}:*"]
        vhosts.append({"name": f"gateway|{host}", "domains": domains, "routes": routes})
    return vhosts, [clusters[name] for name in sorted(clusters)]


def merge_virtual_hosts(
    first: list[dict[str, Any]], second: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Virtual hosts of ``first`` and ``second`` in one route configuration. Envoy refuses a
    domain named by two virtual hosts, so hosts that share a domain are joined, ``first``'s
    routes before ``second``'s (the first match wins)."""
    out: list[dict[str, Any]] = [dict(v, domains=list(v["domains"])) for v in first]
    by_domain = {d: vh for vh in out for d in vh["domains"]}
    for vh in second:
        target = next((by_domain[d] for d in vh["domains"] if d in by_domain), None)
        if target is None:
            copy = dict(vh, domains=list(vh["domains"]))
            out.append(copy)
            by_domain.update({d: copy for d in copy["domains"]})
            continue
        target["routes"] = [*target["routes"], *vh["routes"]]
        for d in vh["domains"]:
            if d not in by_domain:
                target["domains"].append(d)
                by_domain[d] = target
    return out


# -- the mesh (GAMMA) -------------------------------------------------------------------------


def mesh_routes(
    state: ClusterState,
    svc: Service,
    port: int,
    caller_namespace: str,
    tags: dict[str, str] | None = None,
) -> list[dict[str, Any]] | None:
    """The routes a caller's sidecar (in ``caller_namespace``) uses for requests to ``svc``
    port ``port``, when HTTPRoutes/GRPCRoutes name that Service as parent; None when none do
    (the sidecar keeps its default route).

    Every route matches the request's resolved destination (the ``x-envoy-original-dst-host``
    header the app's client sets: ``<cluster IP>:<port>``) on top of the route's own match,
    so the list is meant to go first in the outbound virtual host. Backends are the callers'
    per-Service clusters (:func:`mesh.envoy.sidecar.service_cluster_name`); the last route
    answers 404 for requests to the Service that no rule matches, as the API requires.
    ``tags`` are added to every route's span tags (the sidecar's own tags for ``svc``)."""
    if not svc.cluster_ip or svc.headless:
        return None
    views = service_routes(state, svc.namespace, svc.name, port, caller_namespace)
    if not views:
        return None
    destination = [
        {
            "name": addresses.ORIGINAL_DST_HEADER,
            "string_match": {"exact": f"{svc.cluster_ip}:{port}"},
        }
    ]

    # Imported here: the sidecar renderer imports this module for its outbound routes.
    from mesh.envoy.sidecar import service_cluster_name

    def cluster_of(ref: BackendRef) -> str | None:
        if backend_problem(state, ref) is not None:
            return None
        return service_cluster_name(ref.namespace, ref.name, ref.port)

    entries = [
        (route, rule, match, i)
        for route in views
        for rule in route.rules
        for i, match in enumerate(rule.matches)
    ]
    routes: list[dict[str, Any]] = []
    for route, rule, match, _ in ordered(entries):
        routes += rule_routes(route, rule, match, cluster_of, None, destination, tags)
    names = ", ".join(v.label for v in views)
    routes.append(
        {
            "match": {"prefix": "/", "headers": destination},
            "direct_response": fail_response(404, f"no rule of {names} matches this request"),
            "tracing": span_tags({ROUTE_TAG: names, **(tags or {})}),
        }
    )
    return routes


def mesh_outbound_routes(
    state: ClusterState,
    caller_namespace: str,
    tags_of: Callable[[Service, int], dict[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """:func:`mesh_routes` of every Service port, for a sidecar in ``caller_namespace``: the
    routes to put first in its outbound virtual host (empty when no route binds a Service).
    ``tags_of(service, port)`` gives each Service port's extra span tags."""
    routes: list[dict[str, Any]] = []
    for svc in sorted(state.services, key=lambda s: (s.namespace, s.name)):
        for sp in svc.ports:
            tags = tags_of(svc, sp.port) if tags_of else None
            routes += mesh_routes(state, svc, sp.port, caller_namespace, tags) or []
    return routes


def mesh_backend_services(state: ClusterState) -> list[tuple[str, str, int]]:
    """``(namespace, Service, port)`` of every backend and mirror of the routes bound to
    Services: the per-Service clusters the callers' sidecars need for :func:`mesh_routes`
    (only the existing ones: a missing Service answers 500 instead)."""
    out: dict[tuple[str, str, int], None] = {}
    for route in all_routes(state):
        if route.kind == "TLSRoute" or not any(p.is_service for p in route.parents):
            continue
        for ns, name, port in backend_services(route):
            if backend_problem(state, BackendRef(ns, name, port)) is None:
                out[(ns, name, port)] = None
    return list(out)
