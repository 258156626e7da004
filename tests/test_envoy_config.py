"""Envoy configuration rendered from the model is accepted by the real Envoy binary."""

from __future__ import annotations

import pytest

from mesh import addresses
from mesh.envoy import render_ingress, render_sidecar, validate_config
from mesh.model.controllers import Cluster
from mesh.model.manifests import default_manifest_paths, load_manifests

OTLP = f"http://{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    c = Cluster()
    c.apply(load_manifests(default_manifest_paths()))
    return c


@pytest.mark.parametrize("app", ["frontend", "reviews"])
def test_sidecar_config_validates_and_owns_the_pod_ports(cluster: Cluster, app: str) -> None:
    pod = next(p for p in cluster.state.pods if p.labels["app"] == app)
    config = render_sidecar(pod, cluster.state, OTLP)
    ok, output = validate_config(config)
    assert ok, output
    listeners = {
        (
            li["address"]["socket_address"]["address"],
            li["address"]["socket_address"]["port_value"],
        ): li["name"]
        for li in config["static_resources"]["listeners"]
    }
    port = pod.containers[0].ports[0].container_port
    assert listeners[(pod.ip, port)] == f"inbound_{port}"
    assert listeners[(pod.ip, addresses.SIDECAR_OUTBOUND_PORT)] == "outbound"
    inbound = next(
        c for c in config["static_resources"]["clusters"] if c["name"] == f"inbound|{port}"
    )
    protocol = inbound["typed_extension_protocol_options"]
    grpc = "http2_protocol_options" in str(protocol)
    assert grpc == (app == "reviews")


def test_ingress_routes_hosts_to_service_vips(cluster: Cluster) -> None:
    config = render_ingress(cluster.state, OTLP)
    ok, output = validate_config(config)
    assert ok, output
    vhost = next(
        v
        for li in config["static_resources"]["listeners"]
        for f in li["filter_chains"][0]["filters"]
        for v in f["typed_config"]["route_config"]["virtual_hosts"]
        if "shop.local" in v["domains"]
    )
    route = vhost["routes"][0]
    assert route["match"] == {"prefix": "/"}
    target = next(
        c for c in config["static_resources"]["clusters"] if c["name"] == route["route"]["cluster"]
    )
    addr = target["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    frontend = cluster.state.service("shop", "frontend")
    assert frontend is not None
    assert addr["socket_address"]["address"] == frontend.cluster_ip
