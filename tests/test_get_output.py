"""``hopscope get -o json|yaml`` prints Kubernetes objects; READY counts real containers.

Every object is validated against the official OpenAPI schemas with ``kubernetes-validate``
(strict: a field the API does not have is an error), then read back with the jq paths a
kubectl user would type. The first part renders the model without processes; the second
(``e2e``) drives the real CLI against a running cluster, including ``apply`` of a manifest
with a bad enum value.
"""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh import addresses
from mesh.cli.get_cmds import _pod_rows
from mesh.model.controllers import Cluster
from mesh.model.k8s_objects import list_object, to_object
from mesh.model.manifests import KUBERNETES_VERSION, default_manifest_paths, load_manifests
from tests.e2e_support import api_get, hopscope, plan

ROOT = Path(__file__).resolve().parents[1]
ECHO = ROOT / "tests" / "manifests" / "echo.yaml"


def jq(doc: Any, path: str) -> list[Any]:
    """The values a simple jq path (``.items[].status.podIP``) selects, in order."""
    values = [doc]
    for part in path.strip(".").replace("[]", ".[]").split("."):
        if not part:
            continue
        if part == "[]":
            values = [v for value in values for v in value]
        else:
            values = [value[part] for value in values if part in value]
    return values


def validate(obj: dict[str, Any]) -> None:
    """Raise if ``obj`` is not a valid object of its kind for the API version we model."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def validate_list(doc: dict[str, Any]) -> None:
    assert (doc["apiVersion"], doc["kind"]) == ("v1", "List")
    assert doc["metadata"] == {"resourceVersion": ""}
    for item in doc["items"]:
        validate(item)


# -- the model rendered (no processes) --------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Cluster:
    cluster = Cluster()
    cluster.apply(load_manifests([*default_manifest_paths(), ECHO]))
    for pod in cluster.pods_to_start():
        cluster.set_pod_running(pod.namespace, pod.name)
        cluster.set_pod_ready(pod.namespace, pod.name, True)
    catalog = next(p for p in cluster.state.pods if p.name.startswith("catalog-"))
    cluster.set_ready_override("shop", catalog.name, False)
    echo = next(p for p in cluster.state.pods if p.namespace == "echo")
    cluster.delete_pod("echo", echo.name)
    return cluster


def _objects(cluster: Cluster, attr: str) -> dict[str, Any]:
    items = [to_object(i, cluster.state) for i in getattr(cluster.state, attr)]
    return json.loads(json.dumps(list_object(items)))


@pytest.mark.parametrize(
    "attr", ["pods", "services", "endpoint_slices", "ingresses", "network_policies"]
)
def test_every_object_passes_the_kubernetes_schema(model: Cluster, attr: str) -> None:
    doc = _objects(model, attr)
    assert doc["items"]
    validate_list(doc)


def test_the_schema_check_can_fail() -> None:
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "status": {"ip": "1"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


def test_pods_read_like_the_api_server(model: Cluster) -> None:
    doc = _objects(model, "pods")
    pods = {p.name: p for p in model.state.pods}
    assert jq(doc, ".items[].status.podIP") == [p.ip for p in model.state.pods]
    assert jq(doc, ".items[].spec.nodeName") == [p.node for p in model.state.pods]
    assert jq(doc, ".items[].status.podIPs[].ip") == [p.ip for p in model.state.pods]
    node_ips = {n.name: n.ip for n in model.state.nodes}
    for item in doc["items"]:
        pod = pods[item["metadata"]["name"]]
        assert item["status"]["hostIP"] == node_ips[pod.node]
        names = [s["name"] for s in item["status"]["containerStatuses"]]
        ready = {c["type"]: c["status"] for c in item["status"]["conditions"]}["Ready"]
        if pod.namespace == "shop":
            assert sorted(names) == sorted([pod.containers[0].name, "envoy"]), names
        else:  # echo pods run without a sidecar
            assert names == ["echo"], names
        if pod.phase == "Terminating":
            assert "deletionTimestamp" in item["metadata"]
            assert item["status"]["phase"] == "Running"
        else:
            assert item["status"]["phase"] == pod.phase  # Running, or Pending (a replacement)
            assert ready == ("True" if pod.ready else "False")
    catalog = next(i for i in doc["items"] if i["metadata"]["name"].startswith("catalog-"))
    assert catalog["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    statuses = {s["name"]: s["ready"] for s in catalog["status"]["containerStatuses"]}
    assert statuses == {"catalog": False, "envoy": True}


def test_services_read_like_the_api_server(model: Cluster) -> None:
    doc = _objects(model, "services")
    by_name = {i["metadata"]["name"]: i for i in doc["items"]}
    catalog = model.state.service("shop", "catalog")
    assert catalog is not None
    assert by_name["catalog"]["spec"]["clusterIP"] == catalog.cluster_ip
    assert by_name["catalog"]["spec"]["clusterIPs"] == [catalog.cluster_ip]
    assert by_name["catalog"]["status"] == {"loadBalancer": {}}
    lb = by_name["echo-lb"]
    assert lb["spec"]["type"] == "LoadBalancer"
    assert jq(lb, ".status.loadBalancer.ingress[].ip")[0].startswith("127.200.")
    assert all(isinstance(p, int) for p in jq(lb, ".spec.ports[].nodePort"))
    assert jq(by_name["echo-cluster"], ".spec.ports[].nodePort") == [30080]
    assert by_name["echo-local"]["spec"]["externalTrafficPolicy"] == "Local"
    sticky = by_name["echo-sticky"]["spec"]
    assert sticky["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 60}}


def test_endpoint_slices_read_like_the_api_server(model: Cluster) -> None:
    doc = _objects(model, "endpoint_slices")
    catalog = [
        i
        for i in doc["items"]
        if i["metadata"]["labels"]["kubernetes.io/service-name"] == "catalog"
    ]
    assert catalog and catalog[0]["addressType"] == "IPv4"
    conditions = jq(catalog[0], ".endpoints[].conditions.ready")
    assert sorted(conditions) == [False, True], conditions
    refs = jq(catalog[0], ".endpoints[].targetRef.name")
    assert all(name.startswith("catalog-") for name in refs)
    assert set(jq(catalog[0], ".endpoints[].nodeName")) <= {"node-a", "node-b"}
    assert jq(catalog[0], ".ports[].port") == [8080]
    echo = [
        i
        for i in doc["items"]
        if i["metadata"]["labels"]["kubernetes.io/service-name"] == "echo-cluster"
    ]
    assert True in jq(echo[0], ".endpoints[].conditions.terminating")


def test_ingress_and_policies_read_like_the_api_server(model: Cluster) -> None:
    ing = _objects(model, "ingresses")
    assert jq(ing, ".items[].status.loadBalancer.ingress[].ip") == [addresses.INGRESS_IP]
    assert "Prefix" in jq(ing, ".items[].spec.rules[].http.paths[].pathType")
    pols = _objects(model, "network_policies")
    default_deny = next(i for i in pols["items"] if i["metadata"]["name"] == "default-deny")
    assert default_deny["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_ready_column_counts_the_real_containers(model: Cluster) -> None:
    _, rows = _pod_rows(model.state.pods, wide=False)
    ready = {row[1]: row[2] for row in rows}
    for pod in model.state.pods:
        if pod.namespace == "echo" and pod.phase == "Running":
            assert ready[pod.name] == "1/1", ready[pod.name]
        elif pod.name.startswith("catalog-") and not pod.ready:
            assert ready[pod.name] == "1/2"  # the sidecar runs, the app is not ready
        elif pod.namespace == "shop":
            assert ready[pod.name] == "2/2"


# -- the real CLI against a running cluster ---------------------------------------------------


def _get(env: dict[str, str], *args: str) -> str:
    return hopscope("get", *args, env=env).stdout


@pytest.mark.e2e
def test_cli_json_and_yaml_are_kubernetes_objects(cluster: dict[str, str]) -> None:
    for resource in ("pods", "svc", "endpointslices", "ingress", "netpol"):
        doc = json.loads(_get(cluster, resource, "-o", "json"))
        validate_list(doc)
        as_yaml = yaml.safe_load(_get(cluster, resource, "-o", "yaml"))
        validate_list(as_yaml)
        assert jq(as_yaml, ".items[].metadata.name") == jq(doc, ".items[].metadata.name")
    pods = json.loads(_get(cluster, "pods", "-n", "shop", "-o", "json"))
    ips = jq(pods, ".items[].status.podIP")
    pods_cidr = ipaddress.ip_network(plan()["POD_NETWORK_CIDR"])
    assert len(ips) == 10 and all(ipaddress.ip_address(ip) in pods_cidr for ip in ips)
    assert set(jq(pods, ".items[].spec.nodeName")) == {"node-a", "node-b"}
    one = json.loads(_get(cluster, "pods", pods["items"][0]["metadata"]["name"], "-o", "json"))
    assert one["kind"] == "Pod"
    validate(one)
    svc = json.loads(_get(cluster, "svc", "catalog", "-n", "shop", "-o", "json"))
    state = api_get("/api/v1/state")
    vip = next(s["cluster_ip"] for s in state["services"] if s["name"] == "catalog")
    assert svc["spec"]["clusterIP"] == vip


@pytest.mark.e2e
def test_cli_ready_column_without_a_sidecar(cluster: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        rows = [line.split() for line in _get(cluster, "pods", "-n", "echo").splitlines()[1:]]
        if (rows and all(r[2] == "1/1" for r in rows)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rows and all(r[2] == "1/1" and r[3] == "Running" for r in rows), rows
    shop = [line.split() for line in _get(cluster, "pods", "-n", "shop").splitlines()[1:]]
    assert shop and all(r[2] == "2/2" for r in shop), shop


@pytest.mark.e2e
def test_cli_apply_refuses_a_bad_enum_and_changes_nothing(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: shop}\n"
        "spec:\n  type: NodePortz\n  selector: {app: catalog}\n  ports: [{port: 80}]\n"
    )
    before = api_get("/api/v1/state")
    proc = hopscope("apply", "-f", str(bad), env=cluster, check=False)
    assert proc.returncode == 1, proc
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("Error: ") and line.endswith(
        ": bad.yaml: Service shop/x: spec.type: 'NodePortz' is not one of "
        "ClusterIP, NodePort, LoadBalancer, ExternalName"
    ), proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout
    after = api_get("/api/v1/state")
    assert after["resource_version"] == before["resource_version"]
    assert not any(s["name"] == "x" for s in after["services"])
