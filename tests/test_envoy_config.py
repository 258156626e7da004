"""Envoy configuration rendered from the model is accepted by the real Envoy binary."""

from __future__ import annotations

import http.client
import http.server
import json
import subprocess
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc

from mesh import addresses
from mesh.envoy import envoy_command, render_ingress, render_sidecar, validate_config
from mesh.model.controllers import Cluster
from mesh.model.manifests import default_manifest_paths, load_manifests
from tests.e2e_support import QuietHandler

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


def test_ingress_reads_routes_and_clusters_only_from_the_directory_it_is_given(
    cluster: Cluster, tmp_path: Path
) -> None:
    inline = render_ingress(cluster.state, OTLP)
    assert "dynamic_resources" not in inline
    config = render_ingress(cluster.state, OTLP, xds_dir=tmp_path)
    ok, output = validate_config(config, node=("ingress-envoy", "ingress"))
    assert ok, output
    cds = config["dynamic_resources"]["cds_config"]["path_config_source"]["path"]
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    rds = hcm["typed_config"]["rds"]["config_source"]["path_config_source"]["path"]
    assert {Path(cds), Path(rds)} == {tmp_path / "cds.json", tmp_path / "rds.json"}
    routes = json.loads((tmp_path / "rds.json").read_text())["resources"][0]
    assert any("shop.local" in vh["domains"] for vh in routes["virtual_hosts"])
    clusters = json.loads((tmp_path / "cds.json").read_text())["resources"]
    inline_clusters = inline["static_resources"]["clusters"]
    assert {c["name"] for c in clusters} < {c["name"] for c in inline_clusters}


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


# -- access logs over OTLP ------------------------------------------------------------------


class _LogsReceiver(logs_service_pb2_grpc.LogsServiceServicer):
    """A real OTLP/gRPC logs endpoint: keeps every record it is sent."""

    def __init__(self) -> None:
        self.records: list[tuple[dict[str, str], Any]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for resource_logs in request.resource_logs:
                resource = {
                    kv.key: kv.value.string_value for kv in resource_logs.resource.attributes
                }
                for scope in resource_logs.scope_logs:
                    self.records.extend((resource, record) for record in scope.log_records)
        return logs_service_pb2.ExportLogsServiceResponse()


class _App(QuietHandler):
    def do_GET(self) -> None:
        self.answer(b"ok\n")


@pytest.mark.e2e
def test_sidecar_ships_access_logs_over_otlp_with_contract_attributes(cluster: Cluster) -> None:
    """Run the real Envoy with a rendered sidecar; a gRPC receiver gets the access log."""
    receiver = _LogsReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    pod = next(p for p in cluster.state.pods if p.labels["app"] == "frontend")
    container_port = pod.containers[0].ports[0].container_port
    app = http.server.ThreadingHTTPServer(
        (pod.ip, container_port + addresses.APP_PORT_OFFSET), _App
    )
    threading.Thread(target=app.serve_forever, daemon=True).start()
    config = render_sidecar(pod, cluster.state, OTLP, f"127.0.0.1:{port}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "envoy.json"
        path.write_text(json.dumps(config))
        envoy = subprocess.Popen(
            envoy_command(path, pod.name, "frontend"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            trace_id = "00" + "ab" * 15  # a leading zero byte must survive
            headers = {"traceparent": f"00-{trace_id}-{'cd' * 8}-01", "host": "frontend"}
            status = _get_when_up(pod.ip, container_port, "/items?x=1", headers)
            assert status == 200
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not receiver.records:
                time.sleep(0.1)
            time.sleep(1.0)  # the other (gRPC-only) logger must stay silent
        finally:
            envoy.terminate()
            envoy.wait(10)
            app.shutdown()
            server.stop(0)
    assert len(receiver.records) == 1, receiver.records  # one logger per kind of request
    resource, record = receiver.records[0]
    attrs = {kv.key: kv.value.string_value for kv in record.attributes}
    assert attrs["log_kind"] == "access" and attrs["direction"] == "inbound", attrs
    assert attrs["response_code"] == "200" and attrs["response_flags"] == "-", attrs
    assert attrs["method"] == "GET" and attrs["path"] == "/items?x=1", attrs
    assert attrs["authority"] == "frontend", attrs
    assert attrs["upstream_host"] == f"{pod.ip}:{container_port + addresses.APP_PORT_OFFSET}"
    assert attrs["upstream_cluster"] == f"inbound|{container_port}", attrs
    assert float(attrs["duration_ms"]) >= 0, attrs
    assert attrs["grpc_status"] == "", attrs  # not a gRPC request
    assert record.trace_id.hex() == trace_id
    assert len(record.span_id) == 8 and record.span_id != bytes(8), record.span_id
    assert resource["service.name"] == "frontend" and resource["k8s.pod.name"] == pod.name


def _get_when_up(ip: str, port: int, path: str, headers: dict[str, str]) -> int:
    deadline = time.monotonic() + 15
    while True:
        try:
            conn = http.client.HTTPConnection(ip, port, timeout=5)
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()  # the whole response, so Envoy logs no downstream reset (DC)
            conn.close()
            return resp.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
