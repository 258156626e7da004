"""The ingress controller's Envoy: an HTTP listener whose routes come from the Ingresses,
and an HTTPS listener for their ``spec.tls`` (:mod:`mesh.envoy.ingress_tls`)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
from mesh.envoy.connection_pool import connection_pool
from mesh.envoy.gateway import gateway_resources, merge_virtual_hosts
from mesh.envoy.ingress_tls import (
    PassthroughChain,
    TlsPlan,
    expired_warnings,
    plan_tls,
    redirect_route,
    tls_listener,
)
from mesh.envoy.sidecar import OUTBOUND_TLS_TAGS, mesh_tls
from mesh.model.meshpolicy import MESH_ROOT_NAMESPACE, destination_rule
from mesh.model.types import ClusterState, IngressPath, Service

INGRESS_TAGS = {"k8s.namespace.name": "hopscope-system", "k8s.pod.name": "ingress-envoy"}


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


@dataclass
class IngressResources:
    """Everything the ingress Envoy serves for one cluster state."""

    routes: dict[str, Any]
    """The HTTP listener's routes (:data:`INGRESS_ROUTES`), with the https redirects."""
    https_routes: dict[str, Any]
    """The routes of the HTTPS listener's terminating chains (:data:`INGRESS_HTTPS_ROUTES`):
    the same hosts, without redirects."""
    clusters: list[dict[str, Any]]
    tls: TlsPlan
    warnings: list[str] = field(default_factory=list)
    """Why something the Ingresses ask for is not served (a missing Secret…)."""


def ingress_config(state: ClusterState, identity: Path | None = None) -> IngressResources:
    """The ingress controller's routes (one virtual host per Ingress rule host), the
    clusters they send to (one per Service port) and the TLS plan, from ``state``.

    With ``identity`` (the ingress's mesh certificate directory) a Service whose workloads
    take mTLS is reached over mTLS, as a mesh's ingress gateway does."""
    plan = plan_tls(state)
    clusters: dict[str, dict[str, Any]] = {}
    vhosts: dict[str, list[tuple[IngressPath, str, str]]] = {}
    for ing in state.ingresses:
        if ing.ingress_class not in (None, "hopscope"):
            continue
        if f"{ing.namespace}/{ing.name}" in plan.passthrough_ingresses:
            continue  # its hosts are served only by SNI, encrypted end to end
        for rule in ing.rules:
            host = rule.host or "*"
            for path in rule.paths:
                cluster = _ingress_cluster(state, ing.namespace, path, clusters, identity)
                vhosts.setdefault(host, []).append((path, cluster, ing.name))
        if ing.default_backend:
            cluster = _ingress_cluster(
                state, ing.namespace, ing.default_backend, clusters, identity
            )
            vhosts.setdefault("*", []).append((ing.default_backend, cluster, ing.name))
    http_hosts, https_hosts = [], []
    for host, entries in sorted(vhosts.items(), key=lambda kv: (kv[0] == "*", kv[0])):
        vhost = _virtual_host(host, entries)
        https_hosts.append(vhost)
        if host in plan.redirect_hosts:
            vhost = {**vhost, "routes": [redirect_route(host)]}
        http_hosts.append(vhost)
    for host in sorted(plan.redirect_hosts - set(vhosts)):  # forced, passthrough hosts
        http_hosts.insert(0, {**_domains(host), "routes": [redirect_route(host)]})
    # Gateway API routes on the same proxy (gatewayClassName hopscope); where a Gateway and
    # an Ingress name one host, the Gateway's routes are tried first.
    gw_http, gw_http_clusters = gateway_resources(state, ("HTTP",))
    gw_https, gw_https_clusters = gateway_resources(state, ("HTTPS",))
    http_hosts = merge_virtual_hosts(gw_http, http_hosts)
    https_hosts = merge_virtual_hosts(gw_https, https_hosts)
    for gw_cluster in gw_http_clusters + gw_https_clusters:
        clusters[gw_cluster["name"]] = gw_cluster
        _, namespace, name, port = gw_cluster["name"].split("|")
        backend = state.service(namespace, name)
        if identity is not None and backend is not None:
            mesh_tls(gw_cluster, state, backend, int(port), MESH_ROOT_NAMESPACE, identity)
    for chain in plan.passthrough:
        if not _passthrough_cluster(state, chain, clusters):
            plan.warnings.append(
                f"Ingress {chain.ingress}: passthrough host {chain.host}: service "
                f"{chain.namespace}/{chain.backend.service} port {chain.backend.port} not "
                "found; connections for it are closed"
            )
    return IngressResources(
        routes={"name": INGRESS_ROUTES, "virtual_hosts": http_hosts},
        https_routes={"name": INGRESS_HTTPS_ROUTES, "virtual_hosts": https_hosts},
        clusters=[clusters[name] for name in sorted(clusters)],
        tls=plan,
        warnings=plan.warnings + expired_warnings(plan),
    )


def ingress_resources(
    state: ClusterState,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The HTTP listener's routes and the clusters (:func:`ingress_config`)."""
    resources = ingress_config(state)
    return resources.routes, resources.clusters


def _domains(host: str) -> dict[str, Any]:
    return {"name": host, "domains": ["*"] if host == "*" else [host, f"{host}:*"]}


def _virtual_host(host: str, entries: list[tuple[IngressPath, str, str]]) -> dict[str, Any]:
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
    return {**_domains(host), "routes": routes}


INGRESS_ROUTES = "ingress"
"""Name of the ingress's route configuration (RDS resource name when served from a file)."""

INGRESS_HTTPS_ROUTES = "ingress_https"
"""Name of the HTTPS listener's route configuration."""


def render_ingress(
    state: ClusterState,
    otlp_endpoint: str,
    log_sink: str | None = None,
    xds_dir: Path | None = None,
    identity: Path | None = None,
) -> dict[str, Any]:
    """The ingress controller's Envoy bootstrap: an HTTP listener with routes from the
    Ingresses, and an HTTPS listener choosing a filter chain by SNI.

    With ``xds_dir`` (the runtime's :attr:`~mesh.runtime.base.Runtime.ingress_xds_dir`)
    routes, clusters and the HTTPS listener are Envoy file-based xDS resources in that
    directory, rewritten by :class:`mesh.controlplane.ingress.IngressController` whenever an
    Ingress, a Secret or a Service it names changes; Envoy picks them up without a restart.
    Files already there are the controller's (newer than ``state``) and are left alone.
    Without a directory, everything is inline, fixed for the life of the process (the HTTPS
    listener is there only if some Ingress asks for TLS).
    """
    from mesh.envoy.xds_files import IngressXds

    static: dict[str, dict[str, Any]] = {OTLP_CLUSTER: otlp_cluster(otlp_endpoint)}
    if log_sink:
        static[OTLP_LOGS_CLUSTER] = otlp_logs_cluster(log_sink)
    resources = ingress_config(state, identity)
    xds = IngressXds(xds_dir) if xds_dir is not None else None
    routes = xds.rds_source() if xds is not None else resources.routes
    hcm = http_connection_manager(
        "ingress",
        "ingress",
        routes,
        "ingress",
        otlp_endpoint,
        INGRESS_TAGS,
        log_sink,
        value_tags=OUTBOUND_TLS_TAGS,
    )
    listeners = [
        http_listener("ingress_http", addresses.INGRESS_IP, addresses.INGRESS_PORT, "INBOUND", hcm)
    ]
    clusters = list(static.values())
    if xds is None:
        clusters += resources.clusters
        https = tls_https_listener(resources, otlp_endpoint, log_sink)
        listeners += [https] if https is not None else []
    config = bootstrap(addresses.INGRESS_IP, listeners, clusters)
    config["admin"]["address"] = socket_address(addresses.INGRESS_IP, addresses.INGRESS_ADMIN_PORT)
    if xds is not None:
        if not xds.exists():
            https = tls_https_listener(resources, otlp_endpoint, log_sink, xds.rds_https_source())
            xds.write(resources, [https] if https is not None else [])
        config["dynamic_resources"] = {
            "cds_config": xds.cds_source(),
            "lds_config": xds.lds_source(),
        }
    return config


def tls_https_listener(
    resources: IngressResources,
    otlp_endpoint: str,
    log_sink: str | None = None,
    rds: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The HTTPS listener for ``resources`` (None without TLS hosts); its terminating
    chains' routes are ``rds`` (from a file) or else inline."""
    routes = rds if rds is not None else resources.https_routes

    def hcm_for(_chain: Any) -> dict[str, Any]:
        return http_connection_manager(
            "ingress_https", "ingress", routes, "ingress", otlp_endpoint, INGRESS_TAGS, log_sink
        )

    names = {c["name"] for c in resources.clusters}

    def passthrough_cluster(chain: PassthroughChain) -> str:
        name = _passthrough_name(chain)
        return name if name in names else ""

    return tls_listener(resources.tls, hcm_for, passthrough_cluster)


def _ingress_cluster(
    state: ClusterState,
    namespace: str,
    path: IngressPath,
    clusters: dict[str, dict[str, Any]],
    identity: Path | None = None,
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
        bind_ip=addresses.INGRESS_SOURCE_IP,
    )
    if identity is not None:
        mesh_tls(clusters[name], state, svc, port, MESH_ROOT_NAMESPACE, identity)
    connection_pool(clusters[name], destination_rule(state, svc, MESH_ROOT_NAMESPACE))
    return name


def _passthrough_name(chain: PassthroughChain) -> str:
    return f"ingress-passthrough|{chain.namespace}|{chain.backend.service}|{chain.backend.port}"


def _passthrough_cluster(
    state: ClusterState, chain: PassthroughChain, clusters: dict[str, dict[str, Any]]
) -> bool:
    """A plain TCP cluster to the passthrough host's Service (the bytes stay encrypted)."""
    svc = state.service(chain.namespace, chain.backend.service)
    port = _service_port(svc, chain.backend.port) if svc is not None else None
    if svc is None or not svc.cluster_ip or svc.headless or port is None:
        return False
    cluster = static_cluster(
        _passthrough_name(chain), svc.cluster_ip, port, bind_ip=addresses.INGRESS_SOURCE_IP
    )
    cluster.pop("typed_extension_protocol_options", None)
    clusters[_passthrough_name(chain)] = cluster
    return True
