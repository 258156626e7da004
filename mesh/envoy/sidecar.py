"""A pod's Envoy sidecar: an inbound listener per containerPort and one outbound listener."""

from __future__ import annotations

from typing import Any

from mesh import addresses
from mesh.envoy.common import (
    INBOUND_IDLE_TIMEOUT,
    bootstrap,
    go_duration,
    http_connection_manager,
    http_listener,
    otlp_cluster,
    otlp_logs_cluster,
    protocol_options,
    static_cluster,
)
from mesh.model.types import SIDECAR_TIMEOUT_ANNOTATION, ClusterState, Pod


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
    listeners, clusters = [], [otlp_cluster(otlp_endpoint)]
    if log_sink:
        clusters.append(otlp_logs_cluster(log_sink))
    inbound_timeout = go_duration(pod.annotations.get(SIDECAR_TIMEOUT_ANNOTATION, "15s"))
    for container in pod.containers:
        for cp in container.ports:
            port = cp.container_port
            grpc = is_grpc_port(pod, port, state)
            cluster = f"inbound|{port}"
            clusters.append(
                static_cluster(
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
            hcm = http_connection_manager(
                f"inbound_{port}", "sidecar-inbound", routes, app, otlp_endpoint, tags, log_sink
            )
            listeners.append(http_listener(f"inbound_{port}", pod.ip, port, "INBOUND", hcm))
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
    hcm = http_connection_manager(
        "outbound", "sidecar-outbound", outbound_routes, app, otlp_endpoint, tags, log_sink
    )
    listeners.append(
        http_listener("outbound", pod.ip, addresses.SIDECAR_OUTBOUND_PORT, "OUTBOUND", hcm)
    )
    return bootstrap(pod.ip, listeners, clusters)


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
        "typed_extension_protocol_options": protocol_options(
            http2, one_request_per_connection=True
        ),
    }


def service_cluster_name(namespace: str, service: str, port: int) -> str:
    """The callers' cluster for one Service port (Istio's naming:
    ``outbound|8080||catalog.shop.svc.cluster.local``); it sends to the Service's address."""
    return f"outbound|{port}||{service}.{namespace}.svc.cluster.local"
