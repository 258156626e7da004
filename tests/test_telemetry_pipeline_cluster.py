"""The local cluster's telemetry pipeline end to end (a real cluster; run under the lock).

``hopscope up --otlp-endpoint URL`` sends every signal of every component kind to a real
OTLP/HTTP server started here (standing in for the user's own backend) as well as to the
embedded store; stopping the receiver alone makes every exporter count its failures, and
delivery resumes once it is started again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mesh import addresses
from mesh.apiclient import read_token
from tests.e2e_support import (
    API,
    ClusterPool,
    ClusterSpec,
    api_get,
    hopscope,
    poll_until,
)
from tests.test_otlp_forward import Backend

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def forwarding_cluster(cluster_pool: ClusterPool) -> Iterator[tuple[dict[str, str], Backend]]:
    """A cluster of its own (tests/conftest.py): it forwards to ``backend``."""
    backend = Backend()
    spec = ClusterSpec(
        up_args=("--otlp-endpoint", backend.url),
        env={
            "OTEL_EXPORTER_OTLP_HEADERS": "x-hopscope-test=yes",
            "OTEL_METRIC_EXPORT_INTERVAL": "2000",
            "OTEL_EXPORTER_OTLP_ENDPOINT": None,
        },
    )
    try:
        with cluster_pool.exclusive(spec, __name__) as cluster:
            yield cluster.env, backend
    finally:
        backend.close()


def _resource_names(messages: list[Any], field: str) -> set[str]:
    names = set()
    for message in messages:
        for resource in getattr(message, field):
            for kv in resource.resource.attributes:
                if kv.key == "service.name":
                    names.add(kv.value.string_value)
    return names


def test_every_signal_of_every_component_kind_reaches_the_users_endpoint(
    forwarding_cluster: tuple[dict[str, str], Backend],
) -> None:
    env, backend = forwarding_cluster
    status = api_get("/api/v1/status")
    assert status["otlp_receiver"]["forward_endpoint"] == backend.url
    for _ in range(3):
        hopscope("curl", "http://shop.local/", env=env)
    hopscope("dig", "catalog.shop.svc.cluster.local", env=env)
    hopscope("traffic", "--rps", "5", "--duration", "2", env=env)

    want_traces = {"frontend", "catalog", "ingress", "kube-proxy", "hopscope-traffic"}
    poll_until(
        lambda: want_traces <= _resource_names(backend.of("/v1/traces"), "resource_spans"),
        timeout=30,
    )
    # Envoy access logs (OTLP/gRPC in, OTLP/HTTP out) and app log records
    poll_until(
        lambda: {"frontend", "ingress"} <= _resource_names(backend.of("/v1/logs"), "resource_logs"),
        timeout=30,
    )
    # every /metrics target: apps, Envoys, kube-proxy, DNS, CNI, the control plane
    want_jobs = {"apps", "envoy", "kube-proxy", "cluster-dns", "cni", "controlplane"}
    poll_until(
        lambda: want_jobs <= _resource_names(backend.of("/v1/metrics"), "resource_metrics"),
        timeout=30,
    )
    names = {
        m.name
        for message in backend.of("/v1/metrics")
        for r in message.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
    }
    # the names a Prometheus-compatible OTLP backend turns into the dashboards' series
    assert {"hopscope_requests", "hopscope_kubeproxy_connections", "coredns_dns_requests"} <= names
    assert all(h.get("x-hopscope-test") == "yes" for _p, h, _m in backend.received)
    # and the embedded store still has the traces
    assert api_get("/api/v1/traces", limit=5)


def _scrape(url: str, name: str, **labels: str) -> float:
    text = requests.get(url, timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # the parser appends _total to counter samples; Envoy exposes them without it
            if name in (sample.name, family.name) and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def _loss_readings(frontend_ips: list[str]) -> dict[str, float]:
    """Loss counters; the frontend's summed over its replicas (any of them may serve)."""
    node = addresses.NODE_IPS["node-a"]
    ingress_stats = f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_ADMIN_PORT}/stats/prometheus"
    failed = {"outcome": "failed"}
    spans = "hopscope_otel_exported_spans_total"
    completed = _scrape(
        ingress_stats, "envoy_cluster_upstream_rq_completed", envoy_cluster_name="hopscope_otlp"
    )
    ok = _scrape(
        ingress_stats,
        "envoy_cluster_upstream_rq_xx",
        envoy_cluster_name="hopscope_otlp",
        envoy_response_code_class="2",
    )
    return {
        "frontend": sum(
            _scrape(f"http://{ip}:{addresses.APP_METRICS_PORT}/metrics", spans, **failed)
            for ip in frontend_ips
        ),
        "frontend_logs": sum(
            _scrape(
                f"http://{ip}:{addresses.APP_METRICS_PORT}/metrics",
                "hopscope_otel_exported_log_records_total",
                **failed,
            )
            for ip in frontend_ips
        ),
        "kube-proxy": _scrape(
            f"http://{node}:{addresses.KUBE_PROXY_METRICS_PORT}/metrics", spans, **failed
        ),
        "ingress-envoy": completed - ok,
        "receiver-unavailable": _scrape(
            f"{API}/metrics", "hopscope_otlp_receiver_requests_total", outcome="unavailable"
        ),
    }


def test_stopping_the_receiver_makes_every_exporter_count_its_loss(
    forwarding_cluster: tuple[dict[str, str], Backend],
) -> None:
    env, _backend = forwarding_cluster
    home_token = read_token(Path(env["HOPSCOPE_HOME"]))
    auth = {"Authorization": f"Bearer {home_token}"}
    pods = api_get("/api/v1/state")["pods"]
    frontends = [p["ip"] for p in pods if p["name"].startswith("frontend")]
    before = _loss_readings(frontends)
    assert (
        requests.post(
            f"{API}/api/v1/debug/receiver", json={"running": False}, timeout=5
        ).status_code
        == 401
    )
    resp = requests.post(
        f"{API}/api/v1/debug/receiver", json={"running": False}, headers=auth, timeout=10
    )
    assert resp.json()["running"] is False
    try:
        for _ in range(3):
            hopscope("curl", "http://shop.local/", env=env)
        # a sender still on the API port's /v1/traces (the compose Collector's path) is told
        # the receiver is down, and the refusal is counted
        down = requests.post(
            f"{API}/v1/traces",
            data=b"",
            headers={"Content-Type": "application/x-protobuf"},
            timeout=5,
        )
        assert down.status_code == 503, down.text
        # the SDK exporters retry for their 5 s timeout before a batch counts as failed
        keys = ("frontend", "frontend_logs", "kube-proxy", "ingress-envoy", "receiver-unavailable")
        deadline = time.monotonic() + 30
        while True:
            after = _loss_readings(frontends)
            rose = {k: after[k] > before[k] for k in keys}
            if all(rose.values()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert all(rose.values()), f"loss not counted: before {before}, after {after}"
    finally:
        resp = requests.post(
            f"{API}/api/v1/debug/receiver", json={"running": True}, headers=auth, timeout=10
        )
    assert resp.json()["running"] is True
    assert after["ingress-envoy"] > before["ingress-envoy"]
    # delivery resumes: a new request's trace is complete in the store again
    started = time.time_ns()
    hopscope("curl", "http://shop.local/", env=env)
    poll_until(
        lambda: any(
            t["start_ns"] >= started and "kube-proxy" in t["hops"] and "app" in t["hops"]
            for t in api_get("/api/v1/traces", limit=5)
        ),
        timeout=20,
    )
