"""Building blocks shared by every Envoy hopscope renders (sidecars and the ingress).

Sockets, clusters, the OpenTelemetry tracing and access-log set-up of an HTTP connection
manager, listeners and the bootstrap around them. Every HTTP connection manager traces with
OpenTelemetry (OTLP/HTTP to the control plane), tags its spans with the hop contract
(``hopscope.hop``, ``k8s.*``) and writes a JSON access log carrying ``%TRACE_ID%``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from mesh import addresses
from mesh.hopattributes import VIA

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

CONNECT_TIMEOUT_S = 1
"""How long Envoy waits for an upstream connection to open (every cluster's
``connect_timeout``). Requests that arrive meanwhile queue on that attempt and fail with it."""

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
    "sidecar-outbound": (90, 56),
}
"""Request header limits per proxy, lowest where a request enters, so the first proxy on
its way is the one to answer 431, never one behind it. Each proxy adds its own headers
(``x-request-id``, ``x-forwarded-*``, ``x-envoy-*``, ``traceparent``, ``x-hopscope-via``), so
what one admits must still fit the next one's limit after them:

- from outside through the ingress: the ingress admits 80 headers and 32 KiB (nginx's
  ingress default of 4 buffers of 8 KiB comes to the same size), well inside the frontend
  sidecar's inbound limit;
- from outside through a NodePort or LoadBalancer: kube-proxy relays the bytes, so the pod's
  sidecar (inbound) is the first proxy; its limits are Envoy's defaults (100, 60 KiB), and
  the apps behind it (waitress) count no headers and take up to 256 KiB, so they never
  answer 431 to what it admits;
- from an app to another: the caller's sidecar (outbound) is first; it admits 10 headers and
  4 KiB fewer than the callee's inbound, room for what it adds."""

MAX_DOWNSTREAM_CONNECTIONS = 50000
"""Envoy warns without a global connection limit; this is far above playground traffic."""


def typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def socket_address(ip: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": ip, "port_value": port}}


def static_cluster(
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
        "connect_timeout": f"{CONNECT_TIMEOUT_S}s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(ip, port)}}]}],
        },
    }
    cluster["typed_extension_protocol_options"] = protocol_options(
        http2, one_request_per_connection, idle_timeout
    )
    if bind_ip:
        cluster["upstream_bind_config"] = {
            "source_address": socket_address(bind_ip, 0)["socket_address"]
        }
    return cluster


HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
"""A cluster's upstream HTTP options: their key in ``typed_extension_protocol_options``."""


def protocol_options(
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
    return {HTTP_PROTOCOL_OPTIONS: typed(HTTP_PROTOCOL_OPTIONS, **options)}


def otlp_cluster(otlp_endpoint: str) -> dict[str, Any]:
    host, port = _host_port(otlp_endpoint)
    cluster = static_cluster(OTLP_CLUSTER, host, port)
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


ATTEMPT_TAG = {"tag": "hopscope.retry.attempt", "request_header": {"name": "x-envoy-attempt-count"}}
"""Which try of the caller's sidecar this request is (1, 2, …): callers' outbound routes
send ``x-envoy-attempt-count``, so a retried request's hops say which try reached them."""

VIA_TAG = {"tag": VIA, "request_header": {"name": "x-hopscope-via"}}
"""The NAT hop (kube-proxy, overlay) a request came through, so hopscope can nest this hop
below it; the trace context itself passes those hops unchanged (``mesh/cni/passthrough.py``)."""


def _tracing(
    service_name: str,
    otlp_endpoint: str,
    tags: dict[str, str],
    upstream_span: bool = False,
    value_tags: dict[str, str] | None = None,
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
            "typed_config": typed(
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
        + [{"tag": k, "value": v} for k, v in {**SPAN_VALUE_TAGS, **(value_tags or {})}.items()]
        + [VIA_TAG, ATTEMPT_TAG],
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
            "typed_config": typed(
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
        "typed_config": typed(
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


def otlp_logs_cluster(log_sink: str) -> dict[str, Any]:
    host, _, port = log_sink.rpartition(":")
    return static_cluster(OTLP_LOGS_CLUSTER, host, int(port), http2=True)


def http_connection_manager(
    stat_prefix: str,
    hop: str,
    route_config: dict[str, Any],
    service_name: str,
    otlp_endpoint: str,
    tags: dict[str, str],
    log_sink: str | None = None,
    value_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An HTTP connection manager; ``tags`` are literal span tags, ``value_tags`` span tags
    filled per request from Envoy's formatter (on top of :data:`SPAN_VALUE_TAGS`)."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=stat_prefix,
            codec_type="AUTO",
            generate_request_id=True,
            tracing=_tracing(
                service_name,
                otlp_endpoint,
                {"hopscope.hop": hop, **tags},
                upstream_span=hop == "ingress",
                value_tags=value_tags,
            ),
            **_routes_field(route_config),
            max_request_headers_kb=HEADER_LIMITS[hop][1],
            common_http_protocol_options={"max_headers_count": HEADER_LIMITS[hop][0]},
            access_log=_access_log(hop, log_sink, service_name, tags),
            http_filters=[
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
                }
            ],
        ),
    }


def _routes_field(route_config: dict[str, Any]) -> dict[str, Any]:
    """Inline routes, or ``{"rds": ...}`` when the routes come from a file (the live ingress)."""
    if "rds" in route_config:
        return {"rds": route_config["rds"]}
    return {"route_config": route_config}


def http_listener(
    name: str, ip: str, port: int, direction: str, hcm: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "address": socket_address(ip, port),
        "traffic_direction": direction,
        "filter_chains": [{"filters": [hcm]}],
    }


def bootstrap(
    admin_ip: str, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "admin": {"address": socket_address(admin_ip, addresses.SIDECAR_ADMIN_PORT)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": RUNTIME}]},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS,
                    ),
                }
            ]
        },
    }


def go_duration(text: str) -> str:
    """A Go duration as a protobuf Duration string (``1.5s``)."""
    from mesh.model.manifests import parse_duration

    return f"{parse_duration(text):.3f}s"
