"""The mesh's policies: which mode a workload port runs, what its callers originate, and the
sidecar listeners and clusters that follow (checked by the real Envoy's ``--mode validate``).
The handshakes themselves are in tests/test_e2e_mtls.py and tests/test_identity_envoy.py."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from mesh.controlplane.mesh import MeshController
from mesh.envoy import validate_config
from mesh.envoy.common import CONNECT_TIMEOUT_S, HTTP_PROTOCOL_OPTIONS, bootstrap, otlp_cluster
from mesh.envoy.ingress import ingress_config
from mesh.envoy.sidecar import (
    OUTBOUND_ROUTES,
    RDS_FILE,
    SidecarResources,
    sidecar_resources,
)
from mesh.envoy.xds_files import SidecarXds
from mesh.identity.ca import CertificateAuthority
from mesh.identity.sds import CERT_FILE, write_secrets
from mesh.model.controllers import Cluster
from mesh.model.manifests import (
    ManifestError,
    default_manifest_paths,
    load_document,
    load_manifests,
)
from mesh.model.meshpolicy import mtls_mode, upstream
from mesh.runtime.local import LocalRuntime

OTLP = "http://127.10.0.254:4318"


def _policy(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _rule(spec: dict[str, Any], name: str = "catalog") -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    }


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster()
    c.apply(load_manifests(default_manifest_paths()))
    return c


def _apply(c: Cluster, *docs: dict[str, Any]) -> None:
    c.apply([load_document(d, "test.yaml", i) for i, d in enumerate(docs)])


def _pod(c: Cluster, app: str) -> Any:
    return next(p for p in c.state.pods if p.labels.get("app") == app)


def test_the_mode_follows_istios_precedence(cluster: Cluster) -> None:
    catalog = {"app": "catalog", "version": "v1"}
    assert mtls_mode(cluster.state, "shop", catalog, 8080).policy == "hopscope default"
    assert mtls_mode(cluster.state, "shop", catalog, 8080).mode == "DISABLE"
    _apply(cluster, _policy("mesh", "hopscope-system", {"mtls": {"mode": "STRICT"}}))
    assert mtls_mode(cluster.state, "shop", catalog, 8080).mode == "STRICT"
    _apply(cluster, _policy("default", "shop", {"mtls": {"mode": "PERMISSIVE"}}))
    got = mtls_mode(cluster.state, "shop", catalog, 8080)
    assert (got.mode, got.policy) == ("PERMISSIVE", "PeerAuthentication shop/default")
    workload = {
        "selector": {"matchLabels": {"app": "catalog"}},
        "mtls": {"mode": "UNSET"},
        "portLevelMtls": {"8080": {"mode": "DISABLE"}},
    }
    _apply(cluster, _policy("catalog", "shop", workload))
    assert mtls_mode(cluster.state, "shop", catalog, 8080).mode == "DISABLE"  # the port's
    # UNSET for another port inherits from the namespace's policy, not the workload's
    assert mtls_mode(cluster.state, "shop", catalog, 9090).mode == "PERMISSIVE"
    assert mtls_mode(cluster.state, "shop", {"app": "frontend"}, 8080).mode == "PERMISSIVE"


def test_callers_originate_mtls_automatically_unless_a_rule_says_otherwise(
    cluster: Cluster,
) -> None:
    catalog = cluster.state.service("shop", "catalog")
    assert catalog is not None
    assert not upstream(cluster.state, catalog, 8080, "shop").mtls  # default DISABLE
    _apply(cluster, _policy("default", "shop", {"mtls": {"mode": "PERMISSIVE"}}))
    up = upstream(cluster.state, catalog, 8080, "shop")
    assert up.mtls and up.reason == "automatic mTLS"
    assert up.identities == ["spiffe://cluster.local/ns/shop/sa/default"]
    _apply(cluster, _rule({"host": "catalog", "trafficPolicy": {"tls": {"mode": "DISABLE"}}}))
    up = upstream(cluster.state, catalog, 8080, "shop")
    assert not up.mtls and up.reason == "DestinationRule shop/catalog tls.mode DISABLE"
    assert up.peer is not None and up.peer.mode == "PERMISSIVE"


def _static(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return bootstrap("127.0.0.1", listeners, [otlp_cluster(OTLP), *clusters])


def _publish(directory: Path, resources: SidecarResources) -> None:
    """The sidecar's files as the controller publishes them: the outbound listener's RDS
    source then finds its routes."""
    assert [r["name"] for r in resources.routes] == [OUTBOUND_ROUTES]
    SidecarXds(directory).write(*resources)
    assert (directory / RDS_FILE).is_file()


@pytest.mark.parametrize(
    ("mode", "chains", "default_chain"),
    [
        ("STRICT", ["mtls"], False),
        ("PERMISSIVE", ["mtls"], True),
        ("DISABLE", ["plaintext"], False),
    ],
)
def test_inbound_listeners_follow_the_mode_and_envoy_accepts_them(
    cluster: Cluster, tmp_path: Path, mode: str, chains: list[str], default_chain: bool
) -> None:
    write_secrets(tmp_path, CertificateAuthority.create().issue("shop", "default"))
    _apply(cluster, _policy("default", "shop", {"mtls": {"mode": mode}}))
    pod = _pod(cluster, "catalog")
    resources = sidecar_resources(pod, cluster.state, OTLP, files=tmp_path)
    _publish(tmp_path, resources)
    listeners, clusters, _ = resources
    inbound = next(li for li in listeners if li["name"] == "inbound_8080")
    assert [c["name"] for c in inbound["filter_chains"]] == chains
    assert ("default_filter_chain" in inbound) == default_chain
    assert ("listener_filters" in inbound) == (mode != "DISABLE")
    ok, output = validate_config(_static(listeners, clusters), ("catalog", "catalog"))
    assert ok, output[-2000:]


def test_outlier_detection_gives_callers_the_pods_through_their_node_gateway(
    cluster: Cluster, tmp_path: Path
) -> None:
    write_secrets(tmp_path, CertificateAuthority.create().issue("shop", "default"))
    outliers = {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "60s"}
    _apply(cluster, _rule({"host": "catalog", "trafficPolicy": {"outlierDetection": outliers}}))
    for pod in cluster.state.pods:
        cluster.set_pod_running(pod.namespace, pod.name)
        cluster.set_pod_ready(pod.namespace, pod.name, True)
    frontend = _pod(cluster, "frontend")
    resources = sidecar_resources(frontend, cluster.state, OTLP, files=tmp_path)
    _publish(tmp_path, resources)
    listeners, clusters, _ = resources
    catalog = next(c for c in clusters if c["name"].startswith("outbound|8080||catalog."))
    assert catalog["outlier_detection"]["consecutive_5xx"] == 2
    assert catalog["outlier_detection"]["base_ejection_time"] == "60.000s"
    hosts = {
        e["endpoint"]["address"]["socket_address"]["address"]
        for e in catalog["load_assignment"]["endpoints"][0]["lb_endpoints"]
    }
    pods = {p.ip for p in cluster.state.pods if p.labels.get("app") == "catalog"}
    assert hosts == pods and len(hosts) == 2
    assert catalog["transport_socket"]["name"] == "envoy.transport_sockets.http_11_proxy"
    ok, output = validate_config(_static(listeners, clusters), ("frontend", "frontend"))
    assert ok, output[-2000:]
    bad = _rule({"host": "catalog", "trafficPolicy": {"outlierDetection": {"splitExternal": 1}}})
    with pytest.raises(ManifestError, match=r"spec.trafficPolicy.outlierDetection"):
        load_document(bad, "bad.yaml")


def _common_options(cluster: dict[str, Any]) -> dict[str, Any]:
    options = cluster["typed_extension_protocol_options"][HTTP_PROTOCOL_OPTIONS]
    return options.get("common_http_protocol_options") or {}


def _catalog_cluster(cluster: Cluster) -> tuple[dict[str, Any], list[Any], list[Any]]:
    frontend = _pod(cluster, "frontend")
    listeners, clusters, _ = sidecar_resources(frontend, cluster.state, OTLP)
    catalog = next(c for c in clusters if c["name"].startswith("outbound|8080||catalog."))
    return catalog, listeners, clusters


def test_connection_pool_sets_how_long_caller_connections_live(cluster: Cluster) -> None:
    default, _, _ = _catalog_cluster(cluster)
    assert _common_options(default) == {"max_requests_per_connection": 1}
    assert default["connect_timeout"] == f"{CONNECT_TIMEOUT_S}s"
    pool = {
        "tcp": {"connectTimeout": "250ms", "maxConnectionDuration": "30s", "maxConnections": 4},
        "http": {"maxRequestsPerConnection": 0, "idleTimeout": "5s"},
    }
    _apply(cluster, _rule({"host": "catalog", "trafficPolicy": {"connectionPool": pool}}))
    catalog, listeners, clusters = _catalog_cluster(cluster)
    assert catalog["connect_timeout"] == "0.250s"
    assert _common_options(catalog) == {
        "idle_timeout": "5.000s",
        "max_connection_duration": "30.000s",
    }
    assert catalog["circuit_breakers"]["thresholds"] == [{"max_connections": 4}]
    ok, output = validate_config(_static(listeners, clusters), ("frontend", "frontend"))
    assert ok, output[-2000:]
    pool = {"http": {"maxRequestsPerConnection": 20}}
    _apply(cluster, _rule({"host": "catalog", "trafficPolicy": {"connectionPool": pool}}))
    catalog, _, _ = _catalog_cluster(cluster)
    assert _common_options(catalog) == {"max_requests_per_connection": 20}
    assert catalog["connect_timeout"] == f"{CONNECT_TIMEOUT_S}s"
    for http, where in (
        ({"maxRequestsPerConnection": -1}, "maxRequestsPerConnection"),
        ({"idleTimeout": "soon"}, "idleTimeout"),
    ):
        bad = _rule({"host": "catalog", "trafficPolicy": {"connectionPool": {"http": http}}})
        with pytest.raises(ManifestError, match=rf"spec.trafficPolicy.connectionPool.http.{where}"):
            load_document(bad, "bad.yaml")


def test_the_ingress_follows_the_rule_of_the_service_it_calls(cluster: Cluster) -> None:
    def frontend_cluster() -> dict[str, Any]:
        clusters = ingress_config(cluster.state).clusters
        return next(c for c in clusters if c["name"].startswith("ingress|shop|frontend|"))

    assert _common_options(frontend_cluster()) == {"max_requests_per_connection": 1}
    pool = {"http": {"maxRequestsPerConnection": 0}, "tcp": {"connectTimeout": "2s"}}
    _apply(cluster, _rule({"host": "frontend", "trafficPolicy": {"connectionPool": pool}}))
    assert _common_options(frontend_cluster()) == {}
    assert frontend_cluster()["connect_timeout"] == "2.000s"


def test_the_controller_rotates_certificates_past_half_their_life(
    cluster: Cluster, tmp_path: Path
) -> None:
    runtime = LocalRuntime(tmp_path / "state", "http://127.10.0.254:8001", OTLP)
    mesh = MeshController(cluster, runtime, tmp_path / "identity")
    pod = _pod(cluster, "catalog")
    directory = mesh.prepare(pod, cluster.state)
    assert directory is not None and (directory / CERT_FILE).exists()
    first = mesh.certificate(pod.namespace, pod.name)
    assert first is not None
    assert mesh.rotate_due(first.not_before + dt.timedelta(hours=11)) == 0
    before = (directory / CERT_FILE).read_bytes()
    assert mesh.rotate_due(first.rotate_at + dt.timedelta(seconds=1)) == 1
    second = mesh.certificate(pod.namespace, pod.name)
    assert second is not None and second.serial != first.serial
    assert (directory / CERT_FILE).read_bytes() != before  # in the file Envoy watches
    assert (directory / "lds.json").exists() and (directory / "cds.json").exists()
