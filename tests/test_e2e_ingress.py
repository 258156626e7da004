"""The ingress controller applies Ingress changes to a running Envoy, live.

Real parts: the cluster model (``Cluster``), the ingress controller, the Envoy binary on the
ingress address with the file-based routes, and the control plane's OTLP receiver and trace
store. The Service behind the Ingresses is an HTTP server on the frontend Service's
ClusterIP:port — standing where kube-proxy would accept the connection.

Address plan: ingress 127.200.0.1:8080 (admin 15000 on that address), Service ClusterIP
from the sample manifests (frontend, 127.96.x.y:8080), OTLP receiver on 127.0.0.1:<free>.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from mesh import addresses
from mesh.controlplane.api import create_app
from mesh.controlplane.ingress import IngressController
from mesh.envoy import render_ingress
from mesh.model.controllers import Cluster
from mesh.model.manifests import default_manifest_paths, load_manifests
from mesh.runtime.local import LocalRuntime
from mesh.tracestore.store import TraceStore
from tests.e2e_support import QuietHandler, poll_until

pytestmark = pytest.mark.e2e

LIVE_INGRESS = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: live, namespace: shop}
spec:
  ingressClassName: hopscope
  rules:
    - host: live.example
      http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service: {name: frontend, port: {number: 8080}}
"""


class _Backend(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.answer(f"served {self.headers.get('Host')}".encode())


class _Ingress:
    def __init__(self, cluster: Cluster, store: TraceStore, controller: IngressController):
        self.cluster, self.store, self.controller = cluster, store, controller

    def get(self, host: str) -> int:
        conn = http.client.HTTPConnection(addresses.INGRESS_IP, addresses.INGRESS_PORT, timeout=2)
        try:
            conn.request("GET", "/", headers={"Host": host})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()


@pytest.fixture(scope="module")
def ingress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Ingress]:
    """The ingress as ``ControlPlane.start()`` brings it up: the controller for the local
    runtime first, then the runtime's own ``start_ingress`` (which renders the bootstrap)."""
    tmp = tmp_path_factory.mktemp("ingress")
    cluster = Cluster()
    cluster.apply(load_manifests(default_manifest_paths()))
    frontend = cluster.state.service("shop", "frontend")
    assert frontend is not None
    backend = http.server.ThreadingHTTPServer((frontend.cluster_ip, 8080), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    store = TraceStore(16 * 2**20)
    api = make_server(
        "127.0.0.1", 0, create_app(cluster, store, status=lambda: {"ready": True}), threaded=True
    )
    threading.Thread(target=api.serve_forever, daemon=True).start()
    otlp = f"http://127.0.0.1:{api.server_port}"
    runtime = LocalRuntime(tmp, otlp, otlp)
    controller = IngressController.for_runtime(cluster, runtime)
    assert controller is not None
    controller.start()
    runtime.start_ingress(cluster.state)
    bootstrap = json.loads((runtime.config_dir / "hopscope-system_ingress-envoy.json").read_text())
    assert "cds_config" in bootstrap["dynamic_resources"]  # routes and clusters from files
    assert controller.xds.directory == runtime.ingress_xds_dir  # the files Envoy reads
    ready = f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_ADMIN_PORT}/ready"
    try:
        poll_until(lambda: requests.get(ready, timeout=1).status_code == 200, timeout=20)
        yield _Ingress(cluster, store, controller)
    finally:
        controller.stop()
        runtime.shutdown()
        backend.shutdown()
        backend.server_close()
        api.shutdown()
    # No state outlives the controller: a bootstrap reads files only from a directory passed
    # to it, and rendered without one its routes are inline.
    assert render_ingress(cluster.state, otlp).get("dynamic_resources") is None
    assert runtime.ingress_xds_dir is not None
    from_files = render_ingress(cluster.state, otlp, xds_dir=runtime.ingress_xds_dir)
    assert "cds_config" in from_files["dynamic_resources"]


def _manifest(tmp_path: Path) -> list[Any]:
    path = tmp_path / "live.yaml"
    path.write_text(LIVE_INGRESS)
    return load_manifests([path])


def _within(seconds: float, fn: Any) -> float:
    """Seconds until ``fn()`` is true, failing after ``seconds``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if fn():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not true within {seconds}s")


def test_applied_ingress_is_served_within_a_second_and_traced(
    ingress: _Ingress, tmp_path: Path
) -> None:
    assert ingress.get("shop.local") == 200
    assert ingress.get("live.example") == 404
    ingress.cluster.apply(_manifest(tmp_path))
    took = _within(1.0, lambda: ingress.get("live.example") == 200)
    print(f"new Ingress served after {took * 1000:.0f} ms")
    # The request is traced through the ingress hop, with the Ingress's own route.
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    conn = http.client.HTTPConnection(addresses.INGRESS_IP, addresses.INGRESS_PORT, timeout=2)
    conn.request(
        "GET",
        "/",
        headers={"Host": "live.example", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert conn.getresponse().status == 200
    conn.close()

    def ingress_hop() -> dict[str, Any] | None:
        from mesh.tracestore.hops import build_hops

        hops = build_hops(ingress.store.get(trace_id))
        # The Envoy exports its upstream (router) span and its server span in batches of
        # their own; the hop is whole once the server span, named after the route, is in.
        return next(
            (h for h in hops if h["hop"] == "ingress" and h["name"].startswith("ingress ")),
            None,
        )

    hop = poll_until(ingress_hop, timeout=5)
    assert hop["status"] == "200"
    assert "ingress live live.example/" in hop["name"]


def test_deleted_ingress_answers_404_within_a_second(ingress: _Ingress, tmp_path: Path) -> None:
    objects = _manifest(tmp_path)
    ingress.cluster.apply(objects)
    _within(1.0, lambda: ingress.get("live.example") == 200)
    ingress.cluster.delete(objects)
    took = _within(1.0, lambda: ingress.get("live.example") == 404)
    print(f"deleted Ingress gone after {took * 1000:.0f} ms")
    assert ingress.get("shop.local") == 200  # the others keep being served
