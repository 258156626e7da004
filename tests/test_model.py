"""The cluster model: manifests → pods, Services, EndpointSlices (no processes started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh import addresses
from mesh.model.controllers import MAX_ENDPOINTS_PER_SLICE, SERVICE_TYPES, Cluster
from mesh.model.manifests import ManifestError, default_manifest_paths, load_manifests
from mesh.model.types import ClusterState, ServiceType

DEPLOYMENT = """\
apiVersion: v1
kind: Namespace
metadata: {{name: demo}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: demo}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
        - name: web
          image: demo
          command: ["python", "-m", "http.server"]
          ports: [{{name: http, containerPort: 8000}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"""


def _cluster(tmp_path: Path, replicas: int = 2) -> Cluster:
    path = tmp_path / "demo.yaml"
    path.write_text(DEPLOYMENT.format(replicas=replicas))
    cluster = Cluster()
    cluster.apply(load_manifests([path]))
    return cluster


def _run_all(cluster: Cluster) -> None:
    for pod in cluster.pods_to_start():
        cluster.set_pod_running(pod.namespace, pod.name)


def test_sample_shop_loads_and_validates() -> None:
    cluster = Cluster()
    changes = cluster.apply(load_manifests(default_manifest_paths()))
    assert "namespace/shop created" in changes
    shop = [p for p in cluster.state.pods if p.namespace == "shop"]
    assert len(shop) == 10
    assert sorted(p.name for p in shop if p.labels["app"] == "cache") == ["cache-0", "cache-1"]
    assert cluster.state.network.overlay_delay_ms == 0 and cluster.state.network.vni == 1
    assert cluster.state.dns.ttl == 5
    assert len(cluster.state.network_policies) == 7
    assert {p.node for p in shop if p.labels["app"] == "cache"} == {"node-a", "node-b"}
    for app in ("frontend", "catalog", "reviews", "ratings"):
        pods = [p for p in shop if p.labels["app"] == app]
        assert {p.node for p in pods} == {"node-a", "node-b"}, app
        svc = cluster.state.service("shop", app)
        assert svc is not None and svc.cluster_ip and svc.cluster_ip.startswith("127.96.")
    assert cluster.state.ingresses[0].rules[0].host == "shop.local"


def test_pods_get_addresses_from_their_node_cidr_and_names_like_deployments(
    tmp_path: Path,
) -> None:
    cluster = _cluster(tmp_path, replicas=4)
    pods = cluster.state.pods
    assert len({p.ip for p in pods}) == 4
    for pod in pods:
        assert addresses.node_for_ip(pod.ip) == pod.node
        deployment, template_hash, suffix = pod.name.split("-")
        assert deployment == "web" and len(template_hash) == 10 and len(suffix) == 5


def test_ips_are_released_and_reused(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, replicas=1)
    pod = cluster.state.pods[0]
    cluster.scale("demo", "web", 0)
    assert cluster.pods_to_stop() == [pod]
    cluster.finalize_pod("demo", pod.name)
    cluster.scale("demo", "web", 1)
    assert cluster.state.pods[0].ip == pod.ip


def test_endpoint_slices_follow_readiness(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    (eps,) = cluster.state.slices_for("demo", "web")
    assert [e.ready for e in eps.endpoints] == [False, False]
    assert eps.ports[0].port == 8000  # named targetPort resolved against the pod
    _run_all(cluster)
    first = cluster.state.pods[0]
    cluster.set_pod_ready("demo", first.name, True)
    (eps,) = cluster.state.slices_for("demo", "web")
    ready = {e.pod for e in eps.endpoints if e.ready}
    assert ready == {first.name}
    cluster.set_ready_override("demo", first.name, False)
    (eps,) = cluster.state.slices_for("demo", "web")
    assert not any(e.ready for e in eps.endpoints)


def test_deleted_pod_is_terminating_then_replaced(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    _run_all(cluster)
    victim = cluster.state.pods[0]
    cluster.set_pod_ready("demo", victim.name, True)
    cluster.delete_pod("demo", victim.name)
    (eps,) = cluster.state.slices_for("demo", "web")
    gone = next(e for e in eps.endpoints if e.pod == victim.name)
    assert gone.terminating and not gone.ready
    assert len([p for p in cluster.state.pods if p.phase != "Terminating"]) == 2


def test_slices_hold_at_most_100_endpoints(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, replicas=MAX_ENDPOINTS_PER_SLICE + 5)
    slices = cluster.state.slices_for("demo", "web")
    assert [len(s.endpoints) for s in slices] == [MAX_ENDPOINTS_PER_SLICE, 5]


def test_state_round_trips_through_json(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    again = ClusterState.from_dict(cluster.snapshot())
    assert again == cluster.state


def test_watch_returns_when_the_version_moves(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    version = cluster.state.resource_version
    assert cluster.wait_for_change(version, timeout=0.05)["resource_version"] == version
    cluster.scale("demo", "web", 3)
    assert cluster.wait_for_change(version, timeout=5)["resource_version"] > version


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("port: 80, targetPort: http", None),
        ("port: eighty, targetPort: http", "spec.ports[0].port"),
        ("port: 80, targetPort: http, bogus: 1", "spec.ports[0]"),
    ],
)
def test_invalid_manifests_name_file_object_and_field(
    tmp_path: Path, bad: str, expected: str | None
) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n"
        f"spec:\n  selector: {{app: web}}\n  ports: [{{{bad}}}]\n"
    )
    if expected is None:
        load_manifests([path])
        return
    with pytest.raises(ManifestError) as err:
        load_manifests([path])
    assert str(err.value).startswith("svc.yaml: Service demo/web: " + expected), err.value


def test_affinity_timeout_above_a_day_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n"
        "spec:\n  selector: {app: web}\n  sessionAffinity: ClientIP\n"
        "  sessionAffinityConfig: {clientIP: {timeoutSeconds: 90000}}\n"
        "  ports: [{port: 80}]\n"
    )
    with pytest.raises(ManifestError, match=r"timeoutSeconds: 90000 is not in 1\.\.86400"):
        load_manifests([path])


def test_node_ports_are_allocated_checked_and_load_balancers_get_addresses(
    tmp_path: Path,
) -> None:
    cluster = _cluster(tmp_path)
    base = "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n"
    spec = "spec:\n  type: {type}\n  selector: {{app: web}}\n  ports: [{{port: 80{extra}}}]\n"

    def service(name: str, svc_type: str, extra: str = "") -> list:  # type: ignore[type-arg]
        path = tmp_path / f"{name}.yaml"
        path.write_text(base.format(name=name) + spec.format(type=svc_type, extra=extra))
        return load_manifests([path])

    cluster.apply(service("np", "NodePort"))
    np = cluster.state.service("demo", "np")
    assert np is not None and np.ports[0].node_port == 30000
    cluster.apply(service("lb", "LoadBalancer"))
    lb = cluster.state.service("demo", "lb")
    assert lb is not None and lb.load_balancer_ingress == ["127.200.0.2"]
    with pytest.raises(ManifestError, match="30000 is already allocated"):
        cluster.apply(service("dup", "NodePort", ", nodePort: 30000"))
    with pytest.raises(ManifestError, match="outside the NodePort range"):
        cluster.apply(service("low", "NodePort", ", nodePort: 80"))


def test_unknown_namespace_and_bad_yaml_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(DEPLOYMENT.format(replicas=1).split("---", 1)[1])
    with pytest.raises(ManifestError, match="namespace 'demo' not found"):
        Cluster().apply(load_manifests([path]))
    path.write_text("kind: [unclosed")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifests([path])


def test_cni_and_coredns_config_maps_are_checked() -> None:
    from mesh.model.manifests import ManifestError, dns_config, load_document

    def cni(data: dict[str, str]) -> object:
        doc = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "hopscope-cni", "namespace": "kube-system"},
            "data": data,
        }
        return load_document(doc, "cni.yaml")

    config = cni({"overlayDelay": "25ms", "vni": "42", "egressIPs": "node-a=127.60.0.9"})
    assert config.overlay_delay_ms == 25 and config.vni == 42  # type: ignore[attr-defined]
    for bad, message in (
        ({"overlayDelay": "soon"}, "data.overlayDelay"),
        ({"overlayDelay": "9s"}, "between 0s and 5s"),
        ({"vni": "0"}, "data.vni"),
        ({"egressIPs": "node-a"}, "NODE=IP"),
        ({"backend": "gre"}, "data.backend"),
        ({"mtu": "1450"}, "unsupported key"),
    ):
        with pytest.raises(ManifestError, match=message):
            cni(bad)
    assert dns_config("kubernetes cluster.local {\n  ttl 30\n}\n", "x").ttl == 30
    assert dns_config(".:53 {\n  cache 30\n}\n", "x").ttl is None  # ttl outside the plugin
    with pytest.raises(ManifestError, match="ttl SECONDS"):
        dns_config("kubernetes cluster.local {\n  ttl 99999\n}", "x")


# -- Service address allocation ---------------------------------------------------------


def _service(tmp_path: Path, name: str, svc_type: str, spec: str = "") -> list:  # type: ignore[type-arg]
    path = tmp_path / f"{name}-{svc_type}.yaml"
    path.write_text(
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n"
        f"spec:\n  type: {svc_type}\n  selector: {{app: web}}\n{spec}"
        "  ports: [{port: 80, name: http}]\n"
    )
    return load_manifests([path])


def test_every_service_type_has_one_entry_in_the_type_table() -> None:
    assert set(SERVICE_TYPES) == set(ServiceType)


def test_a_refused_service_leaks_no_address(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    cluster.apply(_service(tmp_path, "first", "NodePort"))
    first = cluster.state.service("demo", "first")
    assert first is not None and first.ports[0].node_port == 30000
    taken = _service(tmp_path, "taken", "NodePort")
    taken[0].ports[0].node_port = 30000
    with pytest.raises(ManifestError, match="30000 is already allocated"):
        cluster.apply(taken)
    assert cluster.state.service("demo", "taken") is None
    cluster.apply(_service(tmp_path, "second", "NodePort"))
    second = cluster.state.service("demo", "second")
    assert second is not None and first.cluster_ip and second.cluster_ip
    # the refused Service's ClusterIP and ports went back to the pools
    assert int(second.cluster_ip.rsplit(".", 1)[1]) == int(first.cluster_ip.rsplit(".", 1)[1]) + 1
    assert second.ports[0].node_port == 30001


def test_a_type_change_gives_back_what_the_old_type_held(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    local = "  externalTrafficPolicy: Local\n"
    cluster.apply(_service(tmp_path, "lb", "LoadBalancer", local))
    lb = cluster.state.service("demo", "lb")
    assert lb is not None and lb.load_balancer_ingress == ["127.200.0.2"]
    assert (lb.ports[0].node_port, lb.health_check_node_port) == (30000, 30001)
    cluster.apply(_service(tmp_path, "lb", "LoadBalancer", local))  # an update keeps all
    again = cluster.state.service("demo", "lb")
    assert again is not None and again.cluster_ip == lb.cluster_ip
    assert again.load_balancer_ingress == ["127.200.0.2"]
    assert (again.ports[0].node_port, again.health_check_node_port) == (30000, 30001)
    cluster.apply(_service(tmp_path, "lb", "ClusterIP"))
    plain = cluster.state.service("demo", "lb")
    assert plain is not None and plain.cluster_ip == lb.cluster_ip
    assert plain.ports[0].node_port is None and plain.health_check_node_port is None
    assert plain.load_balancer_ingress == []
    cluster.apply(_service(tmp_path, "other", "LoadBalancer", local))
    other = cluster.state.service("demo", "other")
    assert other is not None and other.load_balancer_ingress == ["127.200.0.2"]
    assert (other.ports[0].node_port, other.health_check_node_port) == (30000, 30001)
    cluster.delete(_service(tmp_path, "other", "LoadBalancer"))
    cluster.apply(_service(tmp_path, "name", "ExternalName", "  externalName: a.example\n"))
    ext = cluster.state.service("demo", "name")
    assert (
        ext is not None and ext.cluster_ip is None and not cluster.state.slices_for("demo", "name")
    )


# -- workloads and apply ------------------------------------------------------------------


def test_a_workload_no_node_can_run_is_refused_before_it_is_stored(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, replicas=1)
    path = tmp_path / "pinned.yaml"
    path.write_text(
        DEPLOYMENT.format(replicas=1)
        .split("---")[1]
        .replace("name: web,", "name: pinned,")
        .replace("      containers:", "      nodeSelector: {disk: ssd}\n      containers:")
    )
    with pytest.raises(ManifestError, match="nodeSelector: no node matches"):
        cluster.apply(load_manifests([path]))
    assert [w.name for w in cluster.state.workloads] == ["web"]
    assert "scaled to 2" in cluster.scale("demo", "web", 2)  # reconciling still works


def test_objects_before_a_refused_one_are_applied_and_reconciled(tmp_path: Path) -> None:
    cluster = Cluster()
    version = cluster.state.resource_version
    path = tmp_path / "demo.yaml"
    path.write_text(DEPLOYMENT.format(replicas=2))
    objects = load_manifests([path]) + _service(tmp_path, "bad", "NodePort")
    objects[-1].ports[0].node_port = 80  # type: ignore[union-attr]
    with pytest.raises(ManifestError, match=r"spec.ports\[0\].nodePort: 80 is outside"):
        cluster.apply(objects)
    assert len(cluster.state.pods) == 2 and cluster.state.service("demo", "bad") is None
    assert cluster.state.slices_for("demo", "web") and cluster.state.resource_version > version
