"""A pod's Envoy sidecar: an inbound listener per containerPort and one outbound listener.

Inbound, each containerPort's listener follows the port's mTLS mode (``PeerAuthentication``,
:mod:`mesh.model.meshpolicy`): plaintext only, mTLS only (a ``tls_inspector`` picks the
chain; a plaintext connection finds none and is closed), or both. Outbound, every Service
port has its own route (matched on the destination address the app resolved) and cluster
to the Service's address — kube-proxy still picks the pod, unlike Istio, whose sidecars
pick it themselves — originating mTLS when the callee accepts it (automatic mTLS) or a
``DestinationRule`` says so, with the rule's circuit breaker. Span tags say which: TLS
mode and version, the peer's SPIFFE ID, the callee's mode and the policy behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mesh import addresses
from mesh.envoy.common import (
    CONNECT_TIMEOUT_S,
    INBOUND_IDLE_TIMEOUT,
    bootstrap,
    go_duration,
    http_connection_manager,
    http_listener,
    otlp_cluster,
    otlp_logs_cluster,
    protocol_options,
    socket_address,
    static_cluster,
    typed,
)
from mesh.envoy.connection_pool import connection_pool
from mesh.envoy.gateway import mesh_outbound_routes
from mesh.envoy.xds_files import file_source
from mesh.identity.sds import downstream_tls, upstream_tls
from mesh.model.meshpolicy import (
    MtlsMode,
    Upstream,
    pod_mtls_mode,
    service_workloads,
    upstream,
)
from mesh.model.types import (
    SIDECAR_TIMEOUT_ANNOTATION,
    ClusterState,
    DestinationRule,
    Pod,
    Service,
)


def is_grpc_port(pod: Pod, port: int, state: ClusterState) -> bool:
    """A pod port speaks gRPC if it is named ``grpc*`` or a Service says ``appProtocol: grpc``."""
    for c in pod.containers:
        for p in c.ports:
            if p.container_port == port and (p.name or "").startswith("grpc"):
                return True
    for svc in state.services:
        if svc.namespace != pod.namespace or not svc.selector:
            continue
        if not all(pod.labels.get(k) == v for k, v in svc.selector.items()):
            continue
        for sp in svc.ports:
            grpc = sp.app_protocol in ("grpc", "kubernetes.io/h2c")
            if grpc and pod.container_port(sp.target_port) == port:
                return True
    return False


@dataclass(frozen=True)
class _Sidecar:
    """What every part of one pod's sidecar config needs."""

    pod: Pod
    state: ClusterState
    otlp_endpoint: str
    log_sink: str | None
    files: Path | None
    """Where the sidecar reads its certificates (and xDS files); None: no mTLS possible."""

    @property
    def app(self) -> str:
        return self.pod.labels.get("app") or self.pod.owner_name or self.pod.name

    @property
    def tags(self) -> dict[str, str]:
        pod = self.pod
        return {
            "k8s.pod.name": pod.name,
            "k8s.namespace.name": pod.namespace,
            "k8s.node.name": pod.node,
        }

    def hcm(
        self,
        stat_prefix: str,
        hop: str,
        routes: dict[str, Any],
        tags: dict[str, str] | None = None,
        value_tags: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return http_connection_manager(
            stat_prefix,
            hop,
            routes,
            self.app,
            self.otlp_endpoint,
            {**self.tags, **(tags or {})},
            self.log_sink,
            value_tags=value_tags,
        )


def render_sidecar(
    pod: Pod,
    state: ClusterState,
    otlp_endpoint: str,
    log_sink: str | None = None,
    files: Path | None = None,
) -> dict[str, Any]:
    """The bootstrap of one pod's sidecar.

    Without ``files`` every listener and cluster is inline and fixed for the life of the
    process (and no mTLS: there is nowhere to read a certificate from). With ``files`` (the
    directory the control plane keeps the pod's certificates and xDS resources in, as the
    sidecar sees it) listeners and clusters come from ``lds.json`` / ``cds.json`` there, so
    a policy or Service change reaches the running Envoy without a restart."""
    listeners, clusters, _routes = sidecar_resources(pod, state, otlp_endpoint, log_sink, files)
    static = [otlp_cluster(otlp_endpoint)]
    if log_sink:
        static.append(otlp_logs_cluster(log_sink))
    if files is None:
        return bootstrap(pod.ip, listeners, static + clusters)
    config = bootstrap(pod.ip, [], static)
    config["dynamic_resources"] = {
        "lds_config": file_source(files / LDS_FILE),
        "cds_config": file_source(files / CDS_FILE),
    }
    return config


LDS_FILE = "lds.json"
CDS_FILE = "cds.json"
RDS_FILE = "rds.json"
OUTBOUND_ROUTES = "outbound"
"""The outbound listener's route configuration: from ``rds.json`` when the sidecar reads
xDS files, so a Service or route change leaves the listener (and the app's kept-alive
connections to it) alone."""


class SidecarResources(NamedTuple):
    listeners: list[dict[str, Any]]
    clusters: list[dict[str, Any]]
    routes: list[dict[str, Any]]
    """Route configurations the listeners name through RDS (none when every route is
    inline: a sidecar without xDS files)."""


def sidecar_resources(
    pod: Pod,
    state: ClusterState,
    otlp_endpoint: str,
    log_sink: str | None = None,
    files: Path | None = None,
) -> SidecarResources:
    """The sidecar's listeners (inbound per containerPort, one outbound), the clusters they
    send to, and with ``files`` the outbound routes, which the listener then reads from
    ``rds.json`` there."""
    side = _Sidecar(pod, state, otlp_endpoint, log_sink, files)
    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    for container in pod.containers:
        for cp in container.ports:
            listener, cluster = _inbound(side, cp.container_port)
            listeners.append(listener)
            clusters.append(cluster)
    listener, outbound_clusters, routes = _outbound(side)
    return SidecarResources([*listeners, listener], clusters + outbound_clusters, routes)


# -- inbound --------------------------------------------------------------------------------

TLS_INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": typed("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"),
}

INBOUND_TLS_TAGS = {
    "tls.protocol.version": "%DOWNSTREAM_TLS_VERSION%",
    "hopscope.tls.peer_identity": "%DOWNSTREAM_PEER_URI_SAN%",
}
"""Span tags of a request that arrived over mTLS: the TLS version and the caller's identity."""

OUTBOUND_TLS_TAGS = {
    "hopscope.upstream.tls_version": "%UPSTREAM_TLS_VERSION%",
    "hopscope.upstream.peer_identity": "%UPSTREAM_PEER_URI_SAN%",
}
"""Span tags of a request sent on: the TLS version and identity of the callee, if mTLS."""


def _inbound(side: _Sidecar, port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The listener on one containerPort (its filter chains follow the port's mTLS mode) and
    the cluster to the app behind it."""
    pod = side.pod
    cluster = f"inbound|{port}"
    app_cluster = static_cluster(
        cluster,
        pod.ip,
        port + addresses.APP_PORT_OFFSET,
        http2=is_grpc_port(pod, port, side.state),
        bind_ip=pod.ip,
        # Below the app server's own idle close (waitress: 300 s), so the
        # sidecar never sends on a connection the app is closing.
        idle_timeout=INBOUND_IDLE_TIMEOUT,
    )
    timeout = go_duration(pod.annotations.get(SIDECAR_TIMEOUT_ANNOTATION, "15s"))
    routes = {
        "name": cluster,
        "virtual_hosts": [
            {
                "name": "inbound",
                "domains": ["*"],
                "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": timeout}}
                ],
            }
        ],
    }
    mode = pod_mtls_mode(side.state, pod, port)
    policy_tags = {"hopscope.mtls.mode": mode.mode, "hopscope.mtls.policy": mode.policy}
    name = f"inbound_{port}"
    listener: dict[str, Any] = {
        "name": name,
        "address": socket_address(pod.ip, port),
        "traffic_direction": "INBOUND",
        "filter_chains": [],
    }
    plaintext_chain = {
        "name": "plaintext",
        "filters": [
            side.hcm(
                name, "sidecar-inbound", routes, {**policy_tags, "hopscope.tls.mode": "plaintext"}
            )
        ],
    }
    if side.files is None or not mode.accepts_mtls:
        listener["filter_chains"] = [plaintext_chain]
        return listener, app_cluster
    listener["listener_filters"] = [TLS_INSPECTOR]
    listener["filter_chains"] = [
        {
            "name": "mtls",
            "filter_chain_match": {"transport_protocol": "tls"},
            "transport_socket": downstream_tls(side.files),
            "filters": [
                side.hcm(
                    name,
                    "sidecar-inbound",
                    routes,
                    {**policy_tags, "hopscope.tls.mode": "mtls"},
                    INBOUND_TLS_TAGS,
                )
            ],
        }
    ]
    if mode.accepts_plaintext:
        listener["default_filter_chain"] = plaintext_chain
    # A connection no chain takes (plaintext under STRICT) is closed before any HTTP is
    # read: the listener's own log says so (response flag NR).
    listener["access_log"] = [_refused_connection_log(mode)]
    return listener, app_cluster


def _refused_connection_log(mode: MtlsMode) -> dict[str, Any]:
    fmt = {
        "time": "%START_TIME%",
        "level": "warn",
        "logger": "access",
        "hop": "sidecar-inbound",
        "msg": "connection refused: no filter chain accepts it (plaintext under STRICT mTLS)",
        "response_flags": "%RESPONSE_FLAGS%",
        "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "downstream_local": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "transport_failure": "%DOWNSTREAM_TRANSPORT_FAILURE_REASON%",
        "mtls_mode": mode.mode,
        "mtls_policy": mode.policy,
    }
    return {
        "name": "envoy.access_loggers.stdout",
        "filter": {"response_flag_filter": {"flags": ["NR"]}},
        "typed_config": typed(
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            log_format={"json_format": fmt},
        ),
    }


# -- outbound -------------------------------------------------------------------------------


def _outbound(
    side: _Sidecar,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The outbound listener: a route and a cluster per Service port (mTLS as the callee
    accepts it, DestinationRule limits), then the catch-all routes by destination address.
    With xDS files the routes are a route configuration of their own (RDS), returned
    third: Envoy drains a listener that changes, and after ``--drain-time-s`` closes the
    connections still on it, a request in flight on an app's kept-alive connection too."""
    pod = side.pod
    service_routes, clusters, tags = _service_routes(side)
    # Routes (HTTPRoute, GRPCRoute) bound to a Service, the GAMMA way, go first: they
    # replace that Service's own route; its TLS span tags go with them.
    gamma = mesh_outbound_routes(
        side.state, pod.namespace, lambda svc, port: tags.get((svc.namespace, svc.name, port), {})
    )
    clusters += [
        _original_dst_cluster("outbound|original-dst|http1", pod.ip, http2=False),
        _original_dst_cluster("outbound|original-dst|grpc", pod.ip, http2=True),
        static_cluster(
            "outbound|node-gateway",
            addresses.NODE_IPS.get(pod.node, addresses.NODE_IPS["node-a"]),
            addresses.EGRESS_GATEWAY_PORT,
            one_request_per_connection=True,
            bind_ip=pod.ip,
        ),
    ]
    routes: dict[str, Any] = {
        "name": OUTBOUND_ROUTES,
        "virtual_hosts": [
            {
                "name": "outbound",
                "domains": ["*"],
                "routes": gamma + service_routes + _fallback_routes(),
                "include_request_attempt_count": True,
            }
        ],
    }
    dynamic: list[dict[str, Any]] = []
    config: dict[str, Any] = routes
    if side.files is not None:
        dynamic = [routes]
        source = file_source(side.files / RDS_FILE)
        config = {"rds": {"route_config_name": OUTBOUND_ROUTES, "config_source": source}}
    hcm = side.hcm("outbound", "sidecar-outbound", config, value_tags=OUTBOUND_TLS_TAGS)
    listener = http_listener("outbound", pod.ip, addresses.SIDECAR_OUTBOUND_PORT, "OUTBOUND", hcm)
    return listener, clusters, dynamic


def _to(address: str) -> list[dict[str, Any]]:
    return [{"name": addresses.ORIGINAL_DST_HEADER, "string_match": {"exact": address}}]


def _service_routes(
    side: _Sidecar,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple[str, str, int], dict[str, str]]]:
    """A route and a cluster per Service port, and each port's span tags."""
    routes: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    tags: dict[tuple[str, str, int], dict[str, str]] = {}
    for svc in side.state.services:
        if svc.headless:
            pod_routes, pod_clusters = _headless_routes(side, svc)
            routes += pod_routes
            clusters += pod_clusters
            continue
        if not svc.cluster_ip:
            continue
        for sp in svc.ports:
            if sp.protocol != "TCP":
                continue
            name = service_cluster_name(svc.namespace, svc.name, sp.port)
            target = _target_port(side.state, svc, sp.target_port)
            up = upstream(side.state, svc, target, side.pod.namespace) if target else None
            mtls = bool(up and up.mtls and side.files is not None)
            clusters.append(_service_cluster(side, svc, sp.port, name, up, mtls))
            port_tags = tags[(svc.namespace, svc.name, sp.port)] = _route_tags(svc, up, mtls)
            routes.append(
                {
                    "match": {"prefix": "/", "headers": _to(f"{svc.cluster_ip}:{sp.port}")},
                    "route": {"cluster": name, "timeout": "15s"},
                    "tracing": _tags(port_tags),
                }
            )
    return routes, clusters, tags


def _headless_routes(
    side: _Sidecar, svc: Service
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """mTLS to the pods of a headless Service, addressed by pod IP.

    Pod-to-pod traffic goes through the node's gateway (NetworkPolicy, the overlay), which
    reads the destination from the request. Encrypted, it cannot: the sidecar asks the
    gateway for a tunnel first (HTTP ``CONNECT pod-ip:port``, Envoy's HTTP/1.1 proxy
    transport socket) and runs TLS inside it. Pods that take plaintext keep the plain
    path (no route here)."""
    routes: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if not svc.selector or side.files is None:
        return routes, clusters
    gateway = addresses.NODE_IPS.get(side.pod.node, addresses.NODE_IPS["node-a"])
    for pod in side.state.pods:
        if pod.namespace != svc.namespace or not pod.ip or not pod.has_sidecar:
            continue
        if not all(pod.labels.get(k) == v for k, v in svc.selector.items()):
            continue
        for sp in svc.ports:
            target = pod.container_port(sp.target_port)
            if target is None or sp.protocol != "TCP":
                continue
            up = upstream(side.state, svc, target, side.pod.namespace, pod)
            if not up.mtls:
                continue
            name = f"outbound|{target}|{pod.name}|{svc.name}.{svc.namespace}.svc.cluster.local"
            cluster = static_cluster(
                name, pod.ip, target, one_request_per_connection=True, bind_ip=side.pod.ip
            )
            cluster["alt_stat_name"] = stat_name(name)
            tls = _mesh_tls(side.files, up, svc, target)
            if NODE_GATEWAY:
                endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
                endpoint["metadata"] = _via_gateway(gateway)
                tls = _through_gateway(tls)
            cluster["transport_socket"] = tls
            clusters.append(cluster)
            routes.append(
                {
                    "match": {"prefix": "/", "headers": _to(f"{pod.ip}:{target}")},
                    "route": {"cluster": name, "timeout": "15s"},
                    "tracing": _tags(_route_tags(svc, up, True)),
                }
            )
    return routes, clusters


def _sni(svc: Service, port: int) -> str:
    """The SNI a caller's sidecar sends (Istio's form), which L4 hops can read."""
    return f"outbound_.{port}_._.{svc.name}.{svc.namespace}.svc.cluster.local"


def _tags(tags: dict[str, str]) -> dict[str, Any]:
    return {"custom_tags": [{"tag": k, "literal": {"value": v}} for k, v in tags.items()]}


def _route_tags(svc: Service, up: Upstream | None, mtls: bool) -> dict[str, str]:
    tags = {
        "k8s.service.name": svc.name,
        "hopscope.tls.mode": "mtls" if mtls else "plaintext",
    }
    if up is not None:
        tags["hopscope.mtls.origination"] = up.reason
        if up.peer is not None:
            tags["hopscope.mtls.peer_mode"] = up.peer.mode
            tags["hopscope.mtls.peer_policy"] = up.peer.policy
            tags["hopscope.mtls.peer_namespace"] = svc.namespace
    return tags


def _target_port(state: ClusterState, svc: Service, target: int | str) -> int | None:
    """A Service port's targetPort as a number (a named one resolved on its workloads)."""
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for w in service_workloads(state, svc):
        for c in w.template.containers:
            number = c.port_number(target)
            if number is not None:
                return number
    return None


def _service_is_grpc(state: ClusterState, svc: Service, port: int) -> bool:
    for sp in svc.ports:
        if sp.port != port:
            continue
        if sp.app_protocol in ("grpc", "kubernetes.io/h2c"):
            return True
        if isinstance(sp.target_port, str) and sp.target_port.startswith("grpc"):
            return True
        for w in service_workloads(state, svc):
            for c in w.template.containers:
                for cp in c.ports:
                    named_grpc = (cp.name or "").startswith("grpc")
                    if named_grpc and c.port_number(sp.target_port) == cp.container_port:
                        return True
    return False


def _service_cluster(
    side: _Sidecar, svc: Service, port: int, name: str, up: Upstream | None, mtls: bool
) -> dict[str, Any]:
    """To the Service's address (kube-proxy picks the pod), as the callee accepts it; with
    a DestinationRule's ``outlierDetection``, to its pods themselves (see
    :func:`_endpoint_cluster`)."""
    grpc = _service_is_grpc(side.state, svc, port)
    assert svc.cluster_ip is not None
    rule = up.rule if up else None
    outlier = _outlier_detection(rule)
    if outlier:
        cluster = _endpoint_cluster(side, svc, port, name, grpc)
        cluster["outlier_detection"] = outlier
    else:
        cluster = static_cluster(
            name,
            svc.cluster_ip,
            port,
            http2=grpc,
            one_request_per_connection=True,
            bind_ip=side.pod.ip,
        )
    if mtls and side.files is not None and up is not None:
        cluster["transport_socket"] = _mesh_tls(side.files, up, svc, port)
    if outlier and NODE_GATEWAY:
        cluster["transport_socket"] = _through_gateway(cluster.get("transport_socket"))
    cluster["alt_stat_name"] = stat_name(name)
    connection_pool(cluster, rule)
    return cluster


def _endpoint_cluster(
    side: _Sidecar, svc: Service, port: int, name: str, grpc: bool
) -> dict[str, Any]:
    """The Service's ready pods as the cluster's hosts, as Istio's sidecars hold them: Envoy
    balances per request and can eject a pod that keeps failing (outlier detection), which
    it cannot do with the one VIP behind kube-proxy. Each connection goes to the pod through
    the caller's node gateway (NetworkPolicy, the overlay): a ``CONNECT`` tunnel for TLS, an
    absolute-form request for plaintext — Envoy's HTTP/1.1 proxy transport socket."""
    service_port = next(sp for sp in svc.ports if sp.port == port)
    gateway = addresses.NODE_IPS.get(side.pod.node, addresses.NODE_IPS["node-a"])
    endpoints = []
    for ep_slice in side.state.slices_for(svc.namespace, svc.name):
        target = next(
            (
                p.port
                for p in ep_slice.ports
                if p.name == service_port.name or len(ep_slice.ports) == 1
            ),
            None,
        )
        if target is None:
            continue
        for endpoint in ep_slice.endpoints:
            if not endpoint.ready:
                continue
            for address in endpoint.addresses:
                host: dict[str, Any] = {"endpoint": {"address": socket_address(address, target)}}
                if NODE_GATEWAY:
                    host["metadata"] = _via_gateway(gateway)
                endpoints.append(host)
    cluster = static_cluster(name, side.pod.ip, port, http2=grpc, bind_ip=side.pod.ip)
    cluster["load_assignment"] = {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]}
    return cluster


PROXY_ADDRESS_KEY = "envoy.http11_proxy_transport_socket.proxy_address"
"""Endpoint metadata naming the HTTP/1.1 proxy (the node gateway) a connection goes through."""

NODE_GATEWAY = addresses.PLAN != "kernel"
"""Whether pod-to-pod and outbound traffic goes through the CNI emulator's node gateway
(NetworkPolicy, the overlay and egress SNAT in userspace). On the kernel data path the
node's routes, VXLAN device and netfilter rules do that: connections go straight out."""


def _via_gateway(gateway: str) -> dict[str, Any]:
    """Endpoint metadata sending a host's connections through the node gateway."""
    address = socket_address(gateway, addresses.EGRESS_GATEWAY_PORT)
    return {
        "typed_filter_metadata": {
            PROXY_ADDRESS_KEY: typed("envoy.config.core.v3.Address", **address)
        }
    }


def _through_gateway(inner: dict[str, Any] | None) -> dict[str, Any]:
    """``inner`` (TLS, or plaintext) wrapped in the HTTP/1.1 proxy transport socket."""
    return {
        "name": "envoy.transport_sockets.http_11_proxy",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.http_11_proxy.v3.Http11ProxyUpstreamTransport",
            transport_socket=inner
            or {
                "name": "envoy.transport_sockets.raw_buffer",
                "typed_config": typed("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"),
            },
        ),
    }


def _outlier_detection(rule: DestinationRule | None) -> dict[str, Any]:
    """DestinationRule ``outlierDetection`` as Envoy's (Istio's field names and defaults:
    interval 10 s, base ejection 30 s, at most 10 % of the hosts ejected)."""
    if rule is None:
        return {}
    spec = (rule.spec.get("trafficPolicy") or {}).get("outlierDetection")
    if spec is None:
        return {}
    out: dict[str, Any] = {
        "interval": go_duration(spec.get("interval", "10s")),
        "base_ejection_time": go_duration(spec.get("baseEjectionTime", "30s")),
        "max_ejection_percent": spec.get("maxEjectionPercent", 10),
        "consecutive_5xx": spec.get("consecutive5xxErrors", 5),
        "enforcing_consecutive_5xx": 100,
    }
    if "consecutiveGatewayErrors" in spec:
        out["consecutive_gateway_failure"] = spec["consecutiveGatewayErrors"]
        out["enforcing_consecutive_gateway_failure"] = 100
    return out


def mesh_tls(
    cluster: dict[str, Any],
    state: ClusterState,
    svc: Service,
    port: int,
    caller_namespace: str,
    files: Path,
) -> Upstream | None:
    """Originate mTLS on ``cluster`` (to Service ``svc`` port ``port``) when its workloads
    take it (automatic mTLS) or a DestinationRule asks; the certificates from ``files``.
    What the callee accepts, for span tags; None when the port has no target."""
    service_port = next((sp for sp in svc.ports if sp.port == port), None)
    target = _target_port(state, svc, service_port.target_port) if service_port else None
    if target is None:
        return None
    up = upstream(state, svc, target, caller_namespace)
    if up.mtls:
        cluster["transport_socket"] = _mesh_tls(files, up, svc, port)
    return up


def _mesh_tls(files: Path, up: Upstream, svc: Service, port: int) -> dict[str, Any]:
    """The caller's mTLS: its certificate from ``files``, the callee's identities as the
    accepted SANs, Istio's SNI for the Service port."""
    tls = upstream_tls(files, up.identities or None)
    tls["typed_config"]["sni"] = _sni(svc, port)
    return tls


def _fallback_routes() -> list[dict[str, Any]]:
    """Destinations no Service route took, by address: pod IPs and the world outside the
    cluster go to the node's gateway (NetworkPolicy, overlay, egress SNAT); any other address
    (a Service applied since this config was rendered) to kube-proxy as it is."""
    need_header = [{"name": addresses.ORIGINAL_DST_HEADER, "present_match": True}]
    to_pod = [
        {
            "name": addresses.ORIGINAL_DST_HEADER,
            "string_match": {
                "safe_regex": {"regex": addresses.prefix_regex([addresses.POD_NETWORK_CIDR]) + ".*"}
            },
        }
    ]
    outside_cluster = [
        {
            "name": addresses.ORIGINAL_DST_HEADER,
            "string_match": {
                "safe_regex": {"regex": addresses.prefix_regex(addresses.CLUSTER_CIDRS) + ".*"}
            },
            "invert_match": True,
        }
    ]
    plaintext = _tags({"hopscope.tls.mode": "plaintext"})
    routes: list[dict[str, Any]] = [
        {
            "match": {"prefix": "/", "grpc": {}, "headers": need_header},
            "route": {"cluster": "outbound|original-dst|grpc", "timeout": "15s"},
        },
        *(
            [
                {
                    "match": {"prefix": "/", "headers": to_pod},
                    "route": {"cluster": "outbound|node-gateway", "timeout": "15s"},
                },
                {
                    "match": {"prefix": "/", "headers": need_header + outside_cluster},
                    "route": {"cluster": "outbound|node-gateway", "timeout": "15s"},
                },
            ]
            if NODE_GATEWAY
            else []
        ),
        {
            "match": {"prefix": "/", "headers": need_header},
            "route": {"cluster": "outbound|original-dst|http1", "timeout": "15s"},
        },
        {
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 400,
                "body": {
                    "inline_string": "hopscope sidecar: request has no "
                    f"{addresses.ORIGINAL_DST_HEADER} header (the resolved "
                    "destination ip:port)\n"
                },
            },
        },
    ]
    for route in routes:
        route["tracing"] = plaintext
    return routes


def _original_dst_cluster(name: str, bind_ip: str, http2: bool) -> dict[str, Any]:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": f"{CONNECT_TIMEOUT_S}s",
        "cleanup_interval": "30s",
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": addresses.ORIGINAL_DST_HEADER,
        },
        # Leave from the pod's own address, as a pod's packets do.
        "upstream_bind_config": {"source_address": {"address": bind_ip, "port_value": 0}},
        "typed_extension_protocol_options": protocol_options(
            http2, one_request_per_connection=True
        ),
    }


def stat_name(cluster: str) -> str:
    """A cluster's name in Envoy's statistics: the dots of a Service's FQDN would cut the
    metric name apart (``envoy_cluster_shop_svc_cluster_local_…``), so they become ``_``
    and every cluster's counters keep their usual names (``envoy_cluster_upstream_rq_total``
    with ``envoy_cluster_name="outbound|8080||catalog_shop_svc_cluster_local"``)."""
    return cluster.replace(".", "_")


def service_cluster_name(namespace: str, service: str, port: int) -> str:
    """The callers' cluster for one Service port (Istio's naming:
    ``outbound|8080||catalog.shop.svc.cluster.local``); it sends to the Service's address."""
    return f"outbound|{port}||{service}.{namespace}.svc.cluster.local"
