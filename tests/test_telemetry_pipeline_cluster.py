"""The local cluster's telemetry pipeline end to end (a real cluster; run under the lock).

``hopscope up --otlp-endpoint URL`` sends every signal of every component kind to a real
OTLP/HTTP server started here (standing in for the user's own backend) as well as to the
embedded store; stopping the receiver alone makes every exporter count its failures, and
delivery resumes once it is started again.

Who sends what (``service.name`` of the resource):

* traces — the apps (``frontend``, ``catalog``…), the ingress and sidecar Envoys
  (``ingress``, the app's name), ``kube-proxy``, ``cni`` (a request that crosses nodes
  through the overlay), ``hopscope-traffic``;
* logs — the apps' records and the Envoys' access logs (same names), and the system
  components' own records: ``kube-proxy``, ``cluster-dns``, ``cni`` (each logs when it
  starts, and on rule syncs, refused tunnels, denials…);
* metrics — every ``/metrics`` target, through the Prometheus bridge (job ``apps``,
  ``envoy``, ``kube-proxy``, ``cluster-dns``, ``cni``, ``controlplane``). Every metric a
  dashboard queries (but Tempo's own) arrives under the queried name once a
  Prometheus-compatible backend has translated it (tests/test_prom_bridge.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mesh import addresses
from mesh.apiclient import TOKEN_FILE, read_token
from tests.e2e_support import (
    API,
    CATALOG_STRICT,
    ClusterPool,
    ClusterSpec,
    api_get,
    apply_manifest,
    dataplane,
    hopscope,
    pod_page,
    poll_until,
)
from tests.test_otlp_forward import Backend
from tests.test_prom_bridge import (
    bridged_dashboard_names,
    dashboard_metric_names,
    prometheus_series_names,
)

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


CATALOG_OUTLIERS = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog-outliers, namespace: shop}
spec: {host: catalog, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1000}}}
"""
"""Outlier detection on the callers' catalog clusters: its Envoy stats exist only then."""


@pytest.fixture
def mesh_policies(
    forwarding_cluster: tuple[dict[str, str], Backend], tmp_path: Path
) -> Iterator[None]:
    """mTLS on the catalog and outlier detection towards it, so that the sidecars have the
    TLS and outlier statistics the mesh dashboard reads; the shop is put back afterwards."""
    env, _backend = forwarding_cluster
    paths = [
        apply_manifest(env, tmp_path, "strict", CATALOG_STRICT),
        apply_manifest(env, tmp_path, "outliers", CATALOG_OUTLIERS),
    ]
    try:
        yield
    finally:
        for path in paths:
            hopscope("delete", "-f", str(path), env=env)


def test_every_signal_of_every_component_kind_reaches_the_users_endpoint(
    forwarding_cluster: tuple[dict[str, str], Backend], mesh_policies: None
) -> None:
    env, backend = forwarding_cluster
    status = api_get("/api/v1/status")
    assert status["otlp_receiver"]["forward_endpoint"] == backend.url
    for _ in range(3):
        hopscope("curl", "http://shop.local/", env=env)
    hopscope("dig", "catalog.shop.svc.cluster.local", env=env)
    hopscope("traffic", "--rps", "5", "--duration", "2", env=env)

    # (on the kernel path the control plane writes the kube-proxy and overlay hops from
    # conntrack, under those components' names, and forwards them too)
    want_traces = {"frontend", "catalog", "ingress", "kube-proxy", "cni", "hopscope-traffic"}
    kernel = dataplane() == "kernel"

    def traced() -> bool:
        names = _resource_names(backend.of("/v1/traces"), "resource_spans")
        if "cni" not in names:  # the overlay's span needs a request that crosses nodes
            hopscope("curl", "http://shop.local/", env=env)
        return want_traces <= names

    poll_until(traced, timeout=60, interval=1)
    # Envoy access logs (OTLP/gRPC in, OTLP/HTTP out), app log records, and the system
    # components' own log records
    want_logs = {"frontend", "ingress", "kube-proxy", "cluster-dns", "cni"}
    if kernel:  # the kernel carries pod traffic: there is no CNI daemon to log
        want_logs.discard("cni")
    try:
        poll_until(
            lambda: want_logs <= _resource_names(backend.of("/v1/logs"), "resource_logs"),
            timeout=30,
        )
    except AssertionError:
        got = _resource_names(backend.of("/v1/logs"), "resource_logs")
        raise AssertionError(f"no log records from {sorted(want_logs - got)}") from None
    # every /metrics target: apps, Envoys, kube-proxy, DNS, CNI, the control plane
    want_jobs = {"apps", "envoy", "kube-proxy", "cluster-dns", "cni", "controlplane"}
    if kernel:  # kube-proxy's page carries the CNI's series there
        want_jobs.discard("cni")
    poll_until(
        lambda: want_jobs <= _resource_names(backend.of("/v1/metrics"), "resource_metrics"),
        timeout=30,
    )
    # the series names a Prometheus-compatible OTLP backend makes of what it was sent: every
    # metric every dashboard queries (Tempo's aside) is among them
    wanted = bridged_dashboard_names()
    assert {
        "hopscope_requests_total",
        "coredns_dns_requests_total",
        "envoy_http_downstream_rq_xx",
    } <= wanted

    def series() -> set[str]:
        return prometheus_series_names(
            m
            for message in backend.of("/v1/metrics")
            for r in message.resource_metrics
            for s in r.scope_metrics
            for m in s.metrics
        )

    try:
        poll_until(lambda: wanted <= series(), timeout=30)
    except AssertionError:
        where = dashboard_metric_names()
        missing = {name: sorted(where[name]) for name in wanted - series()}
        raise AssertionError(f"dashboard metrics not forwarded: {missing}") from None
    assert all(h.get("x-hopscope-test") == "yes" for _p, h, _m in backend.received)
    # and the embedded store still has the traces
    assert api_get("/api/v1/traces", limit=5)


def _scrape(url: str, name: str, **labels: str) -> float:
    return _count(requests.get(url, timeout=5).text, name, **labels)


def _count(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # the parser appends _total to counter samples; Envoy exposes them without it
            if name in (sample.name, family.name) and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def _loss_readings(env: dict[str, str], frontends: list[str]) -> dict[str, float]:
    """Loss counters; the frontend's summed over its replicas (any of them may serve). On
    the kernel path kube-proxy and the overlay export nothing (their hops are the control
    plane's, from conntrack): no such counters there."""
    node = addresses.NODE_IPS["node-a"]
    failed = {"outcome": "failed"}

    def frontend(name: str) -> float:
        return sum(
            _count(pod_page(env, "shop", pod, addresses.APP_METRICS_PORT, "metrics").text,
                   name, **failed)
            for pod in frontends
        )  # fmt: skip

    ingress_stats = f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_ADMIN_PORT}/stats/prometheus"
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
    readings = {
        "frontend": frontend(spans),
        "frontend_logs": frontend("hopscope_otel_exported_log_records_total"),
        "ingress-envoy": completed - ok,
        "receiver-unavailable": _scrape(
            f"{API}/metrics", "hopscope_otlp_receiver_requests_total", outcome="unavailable"
        ),
    }
    if dataplane() == "userspace":
        kube_proxy = f"http://{node}:{addresses.KUBE_PROXY_METRICS_PORT}/metrics"
        readings["kube-proxy"] = _scrape(kube_proxy, spans, **failed)
        cni = f"http://{node}:{addresses.CNI_METRICS_PORT}/metrics"
        readings["cni"] = _scrape(cni, spans, **failed)
    return readings


ROOT = Path(__file__).resolve().parents[1]
COMPOSE_PROMETHEUS = ROOT / "compose" / "config" / "prometheus.yml"
START_HERE = ROOT / "compose" / "config" / "grafana" / "dashboards" / "start-here.json"

LOCAL_TARGETS = {
    "controlplane": f"{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}",
    "kube-proxy": f"{addresses.NODE_IPS['node-a']}:{addresses.KUBE_PROXY_METRICS_PORT}",
    "coredns": f"{addresses.DNS_METRICS_IP}:{addresses.DNS_METRICS_PORT}",
    "cni": f"{addresses.NODE_IPS['node-a']}:{addresses.CNI_METRICS_PORT}",
}
"""The local cluster's addresses of the compose Prometheus' static targets, by job."""


def _local_prometheus_config(home: Path) -> dict[str, Any]:
    """The compose stack's Prometheus configuration (jobs, discovery, relabelling), pointed
    at the local cluster and scraping every second. Prometheus 2.42 (Debian) does not know
    ``scrape_protocols`` (it asks for OpenMetrics first on its own); no rules are needed.
    On the kernel path the pods' pages come through the API's pod proxy (``?via=api``,
    the API token as bearer credentials), and the CNI's series with kube-proxy's."""
    kernel = dataplane() == "kernel"
    config = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s"}
    config.pop("rule_files", None)
    for job in config["scrape_configs"]:
        if "static_configs" in job:
            name = "kube-proxy" if kernel and job["job_name"] == "cni" else job["job_name"]
            assert name in LOCAL_TARGETS, f"no local address for {job['job_name']}"
            job["static_configs"] = [{"targets": [LOCAL_TARGETS[name]]}]
        for sd in job.get("http_sd_configs", []):
            sd["url"] = f"{API}/api/v1/sd/prometheus" + ("?via=api" if kernel else "")
            sd["refresh_interval"] = "2s"
            if kernel:
                job["authorization"] = {"credentials_file": str(home / TOKEN_FILE)}
    return config


@contextlib.contextmanager
def _prometheus(tmp_path: Path, home: Path) -> Iterator[str]:
    """A real Prometheus scraping the cluster as the compose stack's does; yields its URL
    once every job has been scraped."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (scripts/test installs Debian's prometheus)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(_local_prometheus_config(home)))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    jobs = {"apps", "envoy"} | set(LOCAL_TARGETS)
    try:

        def scraped() -> bool:
            assert proc.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
            up = _promql(base, "up == 1")
            return jobs <= {r["metric"].get("job") for r in up}

        poll_until(scraped, timeout=60, interval=1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _promql(base: str, expr: str) -> list[dict[str, Any]]:
    resp = requests.post(f"{base}/api/v1/query", data={"query": expr}, timeout=10)
    assert resp.status_code == 200, f"{expr}: {resp.text}"
    return resp.json()["data"]["result"]  # type: ignore[no-any-return]


def _loss_panel_queries() -> dict[tuple[str, str], str]:
    """(panel title, refId) → PromQL of every "Telemetry loss" panel, as Grafana sends it."""
    board = json.loads(START_HERE.read_text())
    return {
        (panel["title"], target["refId"]): target["expr"]
        for panel in board["panels"]
        if panel["title"].startswith("Telemetry loss")
        for target in panel["targets"]
    }


LOSS_WANTED = {
    ("spans", "A"): [{"app": "frontend"}],
    ("spans", "B"): [{"job": "kube-proxy"}, {"job": "cni"}],
    ("log records", "A"): [{"app": "frontend"}],
    ("Envoy span exports", "A"): [{"pod": "ingress-envoy"}],
    ("OTLP requests", "A"): [{"signal": "traces", "outcome": "unavailable"}],
}
"""With the receiver stopped: the loss-panel series (by the words after "Telemetry loss: ")
that must read above 0, found by their labels."""


def _loss_panels_show(base: str) -> tuple[bool, dict[str, Any]]:
    """Every loss-panel query answers with series (its labels exist on the real series), and
    the series in ``LOSS_WANTED`` read above 0."""
    seen: dict[str, Any] = {}
    ok = True
    wanted_series = dict(LOSS_WANTED)
    if dataplane() == "kernel":  # kube-proxy and the overlay export nothing there
        wanted_series[("spans", "B")] = []
    for (title, ref), expr in _loss_panel_queries().items():
        result = _promql(base, expr)
        words = title.removeprefix("Telemetry loss: ")
        seen[f"{words} [{ref}]"] = [(r["metric"], float(r["value"][1])) for r in result]
        ok = ok and bool(result)
        for (prefix, want_ref), wanted in wanted_series.items():
            if ref != want_ref or not words.startswith(prefix):
                continue
            for labels in wanted:
                ok = ok and any(
                    labels.items() <= r["metric"].items() and float(r["value"][1]) > 0
                    for r in result
                )
    return ok, seen


def test_stopping_the_receiver_makes_every_exporter_count_its_loss(
    forwarding_cluster: tuple[dict[str, str], Backend], tmp_path: Path
) -> None:
    """Each exporter's own counter rises, and so do the start-here dashboard's loss panels,
    their PromQL evaluated by a real Prometheus that scrapes the cluster the way the compose
    stack's does (same jobs, discovery and relabelling)."""
    env, _backend = forwarding_cluster
    with _prometheus(tmp_path, Path(env["HOPSCOPE_HOME"])) as prometheus:
        _receiver_stopped_and_started(env, prometheus)


def _receiver_stopped_and_started(env: dict[str, str], prometheus: str) -> None:
    home_token = read_token(Path(env["HOPSCOPE_HOME"]))
    auth = {"Authorization": f"Bearer {home_token}"}
    pods = api_get("/api/v1/state")["pods"]
    frontends = [p["name"] for p in pods if p["name"].startswith("frontend")]
    # a healthy cluster: every loss query has series (once two scrapes make a rate), at 0
    healthy: dict[str, Any] = {}

    def answered() -> bool:
        healthy.update(_loss_panels_show(prometheus)[1])
        return all(healthy.values())

    poll_until(answered, timeout=20, interval=1)
    assert all(v == 0 for series in healthy.values() for _m, v in series), healthy
    before = _loss_readings(env, frontends)
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
        keys = tuple(before)
        deadline = time.monotonic() + 45
        while True:
            after = _loss_readings(env, frontends)
            rose = {k: after[k] > before[k] for k in keys}
            if all(rose.values()) or time.monotonic() > deadline:
                break
            if not rose.get("cni", True):  # the overlay's span needs a cross-node request
                hopscope("curl", "http://shop.local/", env=env)
            time.sleep(1)
        assert all(rose.values()), f"loss not counted: before {before}, after {after}"
        # the dashboard shows it: each loss panel's query, as Grafana sends it, evaluated
        # by Prometheus over what it scraped (rate over 1m, so it still reads above 0)
        shown: dict[str, Any] = {}

        def panels_show_loss() -> bool:
            ok, seen = _loss_panels_show(prometheus)
            shown.update(seen)
            return ok

        try:
            poll_until(panels_show_loss, timeout=20, interval=1)
        except AssertionError:
            raise AssertionError(f"loss panels do not show the loss: {shown}") from None
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
