"""The API's Prometheus surfaces: service discovery (pod addresses, or the API's pod proxy for
a Prometheus outside the pods' network) and ``/metrics`` in both expositions."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry, Histogram
from werkzeug.serving import make_server

from mesh import addresses
from mesh.controlplane.api import create_app, prometheus_sd_groups
from mesh.model.types import ClusterState, Pod
from mesh.tracestore.store import TraceStore


class _Cluster:
    """What the API reads of a cluster: its state, under its lock."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        return self.state.to_dict()


def _cluster() -> _Cluster:
    pod = Pod("frontend-1", "shop", {"app": "frontend"}, "node-a", "127.244.1.7", [],
              phase="Running")  # fmt: skip
    return _Cluster(ClusterState(resource_version=1, pods=[pod]))


def test_discovery_names_pod_addresses_or_the_api_pod_proxy() -> None:
    direct = prometheus_sd_groups(_cluster())
    apps = next(g for g in direct if g["labels"]["job"] == "apps")
    assert apps["targets"] == [f"127.244.1.7:{addresses.APP_METRICS_PORT}"]
    assert "__metrics_path__" not in apps["labels"]  # Prometheus' default, /metrics
    envoy = next(g for g in direct if g["labels"].get("pod") == "frontend-1"
                 and g["labels"]["job"] == "envoy")  # fmt: skip
    assert envoy["labels"]["__metrics_path__"] == "/stats/prometheus"

    proxied = prometheus_sd_groups(_cluster(), via_api=True)
    api = f"{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"
    pages = {
        g["labels"]["job"]: g["labels"]["__metrics_path__"]
        for g in proxied
        if g["labels"].get("pod") == "frontend-1"
    }
    assert all(g["targets"] == [api] for g in proxied if g["labels"].get("pod") == "frontend-1")
    assert pages == {
        "apps": f"/api/v1/namespaces/shop/pods/frontend-1:{addresses.APP_METRICS_PORT}"
        "/proxy/metrics",
        "envoy": f"/api/v1/namespaces/shop/pods/frontend-1:{addresses.SIDECAR_ADMIN_PORT}"
        "/proxy/stats/prometheus",
    }
    # the ingress is no pod: its admin address is the host's either way
    ingress = next(g for g in proxied if g["labels"].get("pod") == "ingress-envoy")
    assert ingress["targets"] == [f"{addresses.INGRESS_IP}:{addresses.INGRESS_ADMIN_PORT}"]


@pytest.fixture()
def api() -> Iterator[tuple[str, CollectorRegistry]]:
    registry = CollectorRegistry()
    store = TraceStore(budget_bytes=64 * 2**10, registry=CollectorRegistry())
    app = create_app(_cluster(), store, status=lambda: {"ready": True}, registry=registry)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", registry
    server.shutdown()


def test_discovery_refuses_an_unknown_way_in(api: tuple[str, CollectorRegistry]) -> None:
    url, _ = api
    assert requests.get(f"{url}/api/v1/sd/prometheus?via=api", timeout=5).status_code == 200
    bad = requests.get(f"{url}/api/v1/sd/prometheus?via=tunnel", timeout=5)
    assert bad.status_code == 400 and "via" in bad.json()["error"]


def test_metrics_speak_openmetrics_when_asked_so_exemplars_get_through(
    api: tuple[str, CollectorRegistry],
) -> None:
    url, registry = api
    histogram = Histogram("hop_seconds", "a request", registry=registry)
    histogram.observe(0.2, {"trace_id": "ab" * 16})
    om = requests.get(
        f"{url}/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=5
    )
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert 'trace_id="' + "ab" * 16 in om.text
    # one document: a single EOF marker, at the end, though two registries are written
    assert om.text.count("# EOF") == 1 and om.text.rstrip().endswith("# EOF")
    assert "hopscope_tracestore" in om.text
    plain = requests.get(f"{url}/metrics", timeout=5)
    assert plain.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in plain.text and "# EOF" not in plain.text
