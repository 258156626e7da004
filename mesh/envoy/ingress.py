"""The ingress controller's Envoy: one listener whose routes come from the Ingresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mesh import addresses
from mesh.envoy.common import (
    OTLP_CLUSTER,
    OTLP_LOGS_CLUSTER,
    bootstrap,
    http_connection_manager,
    http_listener,
    otlp_cluster,
    otlp_logs_cluster,
    socket_address,
    static_cluster,
)
from mesh.model.types import ClusterState, IngressPath, Service


def _service_port(svc: Service, port: int | str) -> int | None:
    for sp in svc.ports:
        if port in (sp.port, sp.name) or str(port) == str(sp.port):
            return sp.port
    return None


def _route_match(path: IngressPath) -> dict[str, Any]:
    if path.path_type == "Exact":
        return {"path": path.path}
    if path.path in ("", "/"):
        return {"prefix": "/"}
    # Kubernetes Prefix matching is per path element: /foo matches /foo and /foo/bar only.
    return {"path_separated_prefix": path.path.rstrip("/")}


def ingress_resources(
    state: ClusterState,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ingress controller's routes (one virtual host per Ingress rule host) and the
    clusters they send to (one per Service port), from the Ingresses in ``state``."""
    clusters: dict[str, dict[str, Any]] = {}
    vhosts: dict[str, list[tuple[IngressPath, str, str]]] = {}
    for ing in state.ingresses:
        if ing.ingress_class not in (None, "hopscope"):
            continue
        for rule in ing.rules:
            host = rule.host or "*"
            for path in rule.paths:
                cluster = _ingress_cluster(state, ing.namespace, path, clusters)
                vhosts.setdefault(host, []).append((path, cluster, ing.name))
        if ing.default_backend:
            cluster = _ingress_cluster(state, ing.namespace, ing.default_backend, clusters)
            vhosts.setdefault("*", []).append((ing.default_backend, cluster, ing.name))
    virtual_hosts = []
    for host, entries in sorted(vhosts.items(), key=lambda kv: (kv[0] == "*", kv[0])):
        entries.sort(key=lambda e: (e[0].path_type != "Exact", -len(e[0].path)))
        routes: list[dict[str, Any]] = []
        for path, cluster, name in entries:
            route: dict[str, Any] = {"match": _route_match(path)}
            if cluster:
                route["route"] = {"cluster": cluster, "timeout": "15s"}
            else:
                route["direct_response"] = {
                    "status": 503,
                    "body": {"inline_string": f"service {path.service} not found\n"},
                }
            route["decorator"] = {"operation": f"ingress {name} {host}{path.path}"}
            routes.append(route)
        domains = ["*"] if host == "*" else [host, f"{host}:*"]
        virtual_hosts.append({"name": host, "domains": domains, "routes": routes})
    route_config = {"name": INGRESS_ROUTES, "virtual_hosts": virtual_hosts}
    return route_config, [clusters[name] for name in sorted(clusters)]


INGRESS_ROUTES = "ingress"
"""Name of the ingress's route configuration (RDS resource name when served from a file)."""


def render_ingress(
    state: ClusterState,
    otlp_endpoint: str,
    log_sink: str | None = None,
    xds_dir: Path | None = None,
) -> dict[str, Any]:
    """The ingress controller's Envoy bootstrap: one listener, routes from the Ingresses.

    With ``xds_dir`` (the runtime's :attr:`~mesh.runtime.base.Runtime.ingress_xds_dir`)
    routes and clusters are Envoy file-based xDS resources in that directory, rewritten by
    :class:`mesh.controlplane.ingress.IngressController` whenever an Ingress or a Service it
    names changes; Envoy picks them up without a restart. Files already there are the
    controller's (newer than ``state``) and are left alone. Without a directory, routes and
    clusters are inline, fixed for the life of the process.
    """
    from mesh.envoy.xds_files import IngressXds

    static: dict[str, dict[str, Any]] = {OTLP_CLUSTER: otlp_cluster(otlp_endpoint)}
    if log_sink:
        static[OTLP_LOGS_CLUSTER] = otlp_logs_cluster(log_sink)
    route_config, service_clusters = ingress_resources(state)
    tags = {"k8s.namespace.name": "hopscope-system", "k8s.pod.name": "ingress-envoy"}
    xds = IngressXds(xds_dir) if xds_dir is not None else None
    routes = xds.rds_source() if xds is not None else route_config
    hcm = http_connection_manager(
        "ingress", "ingress", routes, "ingress", otlp_endpoint, tags, log_sink
    )
    listener = http_listener(
        "ingress_http", addresses.INGRESS_IP, addresses.INGRESS_PORT, "INBOUND", hcm
    )
    clusters = list(static.values())
    if xds is None:
        clusters += service_clusters
    config = bootstrap(addresses.INGRESS_IP, [listener], clusters)
    config["admin"]["address"] = socket_address(addresses.INGRESS_IP, addresses.INGRESS_ADMIN_PORT)
    if xds is not None:
        if not xds.exists():
            xds.write(route_config, service_clusters)
        config["dynamic_resources"] = {"cds_config": xds.cds_source()}
    return config


def _ingress_cluster(
    state: ClusterState, namespace: str, path: IngressPath, clusters: dict[str, dict[str, Any]]
) -> str:
    svc = state.service(namespace, path.service)
    if svc is None or not svc.cluster_ip or svc.headless:
        return ""
    port = _service_port(svc, path.port)
    if port is None:
        return ""
    name = f"ingress|{namespace}|{svc.name}|{port}"
    grpc = any(sp.port == port and sp.app_protocol == "grpc" for sp in svc.ports)
    clusters[name] = static_cluster(
        name,
        svc.cluster_ip,
        port,
        http2=grpc,
        one_request_per_connection=True,
        bind_ip=addresses.INGRESS_IP,
    )
    return name
