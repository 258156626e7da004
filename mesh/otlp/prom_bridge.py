"""Every component's Prometheus ``/metrics``, as OTLP metrics for the user's backend.

Each component of the cluster exposes Prometheus metrics (the apps, kube-proxy, DNS, CNI,
the control plane, every Envoy's ``/stats/prometheus``). When hopscope forwards telemetry,
:class:`PrometheusBridge` scrapes every target the control plane knows of — the same list its
Prometheus service discovery serves, plus the system components — every
``OTEL_METRIC_EXPORT_INTERVAL`` ms (default 15 s, Prometheus's usual scrape interval), and
sends the samples as one OTLP ``ExportMetricsServiceRequest`` through the forwarder.

The conversion keeps the names the dashboards query when a Prometheus-compatible backend
ingests OTLP. Prometheus's OTLP translation (``otlptranslator``, default strategy
``UnderscoreEscapingWithSuffixes``; Mimir and Grafana's LGTM image use the same) appends
``_total`` to every *monotonic* Sum and renames nothing else here, because no unit is set. A
cumulative *non-monotonic* Sum becomes a Prometheus gauge under its own name. So:

* counter exposed as ``<name>_total`` → monotonic cumulative Sum named ``<name>``, stored
  again as ``<name>_total``;
* counter exposed without ``_total`` (most of Envoy's: ``envoy_cluster_upstream_rq_xx``,
  ``envoy_listener_ssl_fail_verify_error``…) → non-monotonic cumulative Sum under its exposed
  name, stored under that same name. ``rate()`` reads it exactly as it reads the scraped
  series; a monotonic Sum would arrive as ``…_rq_xx_total``, which no dashboard queries;
* gauge (and untyped) → Gauge;
* histogram → explicit-bucket Histogram (cumulative ``le`` buckets become per-bucket counts);
* summary → Summary with its quantiles.

Sample labels become data-point attributes, and so do the target's own labels (``namespace``,
``pod``, ``node``, ``app``) that a Prometheus scrape would attach to every series; the
resource carries ``service.name`` = the scrape job (Prometheus's ``job``),
``service.instance.id`` = ``host:port`` (``instance``) and the ``k8s.*`` attributes.
Cumulative start times are the bridge's own start (the components' start is not known).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from prometheus_client.parser import text_string_to_metric_families

from mesh.otlp.forward import Forwarder

log = logging.getLogger(__name__)

OTEL_METRIC_EXPORT_INTERVAL = "OTEL_METRIC_EXPORT_INTERVAL"
"""Milliseconds between two scrape-and-send rounds. Default here: 15000."""

DEFAULT_INTERVAL_S = 15.0
SCOPE = "hopscope.prometheus-bridge"

TARGET_ATTRIBUTES = ("namespace", "pod", "node", "app")
"""Target labels a Prometheus scrape attaches to every series: kept as attributes."""

RESOURCE_KEYS = {"pod": "k8s.pod.name", "namespace": "k8s.namespace.name", "node": "k8s.node.name"}


@dataclass(frozen=True)
class Target:
    """One ``/metrics`` URL and the labels Prometheus would attach to its series."""

    url: str
    job: str
    instance: str
    labels: dict[str, str] = field(default_factory=dict)


def targets_from_sd(groups: Iterable[dict[str, Any]]) -> list[Target]:
    """Targets of Prometheus HTTP service-discovery groups (``/api/v1/sd/prometheus``)."""
    out = []
    for group in groups:
        labels = {k: v for k, v in group.get("labels", {}).items() if not k.startswith("__")}
        path = group.get("labels", {}).get("__metrics_path__", "/metrics")
        job = labels.pop("job", "hopscope")
        for host in group.get("targets", []):
            out.append(Target(f"http://{host}{path}", job, host, labels))
    return out


def _attr(key: str, value: str) -> KeyValue:
    kv = KeyValue(key=key)
    kv.value.string_value = value
    return kv


def _attrs(labels: dict[str, str]) -> list[KeyValue]:
    return [_attr(k, v) for k, v in labels.items()]


def convert(
    text: str, target: Target, now_ns: int, start_ns: int
) -> tuple[metrics_pb2.ResourceMetrics, int]:
    """One scrape's exposition as OTLP ``ResourceMetrics``, and how many data points."""
    resource = metrics_pb2.ResourceMetrics()
    res_attrs = {"service.name": target.job, "service.instance.id": target.instance}
    res_attrs.update({RESOURCE_KEYS[k]: v for k, v in target.labels.items() if k in RESOURCE_KEYS})
    resource.resource.attributes.extend(_attrs(res_attrs))
    scope = resource.scope_metrics.add()
    scope.scope.name = SCOPE
    extra = {k: target.labels[k] for k in TARGET_ATTRIBUTES if k in target.labels}
    text, bare = _mark_counters_without_total(text)
    points = 0
    for family in text_string_to_metric_families(text):
        metric = scope.metrics.add(name=family.name, description=family.documentation or "")
        if family.type == "counter":
            points += _sum(metric, family, extra, now_ns, start_ns)
        elif family.type == "gauge" and family.name in bare:
            points += _sum(metric, family, extra, now_ns, start_ns, monotonic=False)
        elif family.type == "histogram":
            points += _histogram(metric, family, extra, now_ns, start_ns)
        elif family.type == "summary":
            points += _summary(metric, family, extra, now_ns, start_ns)
        else:  # gauge, untyped, info, stateset
            for sample in family.samples:
                point = metric.gauge.data_points.add(time_unix_nano=now_ns)
                point.as_double = float(sample.value)
                point.attributes.extend(_attrs({**extra, **sample.labels}))
                points += 1
        if not metric.WhichOneof("data"):
            del scope.metrics[-1]
    return resource, points


def _mark_counters_without_total(text: str) -> tuple[str, set[str]]:
    """The exposition with every counter named without ``_total`` typed as a gauge, and
    their names.

    prometheus_client's parser adds ``_total`` to every counter sample and strips it from the
    family, so ``envoy_cluster_upstream_rq`` (Envoy's per-code counter,
    ``upstream_rq_200``) and ``envoy_cluster_upstream_rq_total`` would come out as two
    families of the same name with the same sample names. Typed as gauges, the former keep
    their exposed name, and :func:`convert` sends them as non-monotonic Sums."""
    bare: set[str] = set()
    if "counter" not in text:
        return text, bare
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            parts = line.split()
            if len(parts) == 4 and not parts[2].endswith("_total"):
                bare.add(parts[2])
                lines[i] = f"# TYPE {parts[2]} gauge"
    return "\n".join(lines), bare


def _sum(
    metric: Any,
    family: Any,
    extra: dict[str, str],
    now_ns: int,
    start_ns: int,
    monotonic: bool = True,
) -> int:
    """``monotonic=False`` for a counter exposed without ``_total``: see the module doc."""
    metric.sum.is_monotonic = monotonic
    metric.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    n = 0
    for sample in family.samples:
        if monotonic and not sample.name.endswith("_total"):
            continue  # _created samples
        point = metric.sum.data_points.add(time_unix_nano=now_ns, start_time_unix_nano=start_ns)
        point.as_double = float(sample.value)
        point.attributes.extend(_attrs({**extra, **sample.labels}))
        n += 1
    return n


def _series_key(labels: dict[str, str], drop: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != drop))


def _histogram(metric: Any, family: Any, extra: dict[str, str], now_ns: int, start_ns: int) -> int:
    metric.histogram.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for sample in family.samples:
        key = _series_key(sample.labels, "le")
        entry = series.setdefault(key, {"buckets": [], "sum": 0.0, "count": 0.0})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), float(sample.value)))
        elif sample.name.endswith("_sum"):
            entry["sum"] = float(sample.value)
        elif sample.name.endswith("_count"):
            entry["count"] = float(sample.value)
    for key, entry in series.items():
        buckets = sorted(entry["buckets"])
        point = metric.histogram.data_points.add(
            time_unix_nano=now_ns, start_time_unix_nano=start_ns
        )
        point.attributes.extend(_attrs({**extra, **dict(key)}))
        point.sum = entry["sum"]
        point.count = int(entry["count"])
        previous = 0.0
        for bound, cumulative in buckets:
            if bound != float("inf"):
                point.explicit_bounds.append(bound)
            point.bucket_counts.append(int(max(0.0, cumulative - previous)))
            previous = cumulative
        if not buckets or buckets[-1][0] != float("inf"):
            point.bucket_counts.append(int(max(0.0, entry["count"] - previous)))
    return len(series)


def _summary(metric: Any, family: Any, extra: dict[str, str], now_ns: int, start_ns: int) -> int:
    series: dict[tuple[tuple[str, str], ...], Any] = {}
    for sample in family.samples:
        key = _series_key(sample.labels, "quantile")
        point = series.get(key)
        if point is None:
            point = metric.summary.data_points.add(
                time_unix_nano=now_ns, start_time_unix_nano=start_ns
            )
            point.attributes.extend(_attrs({**extra, **dict(key)}))
            series[key] = point
        if sample.name.endswith("_sum"):
            point.sum = float(sample.value)
        elif sample.name.endswith("_count"):
            point.count = int(sample.value)
        elif "quantile" in sample.labels:
            point.quantile_values.add(
                quantile=float(sample.labels["quantile"]), value=float(sample.value)
            )
    return len(series)


class PrometheusBridge:
    """Scrapes ``targets()`` every interval and forwards them as OTLP metrics."""

    def __init__(
        self,
        targets: Callable[[], list[Target]],
        forwarder: Forwarder,
        interval_s: float | None = None,
    ) -> None:
        self.targets = targets
        self.forwarder = forwarder
        self.interval_s = interval_s or interval_from_env()
        self.start_ns = time.time_ns()
        self._stop = threading.Event()
        self._session = requests.Session()
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.round()
            except Exception:  # one bad round must not end the bridge
                log.exception("metrics bridge round failed")

    def round(self) -> int:
        """Scrape every target once and queue the result; the number of data points."""
        request = ExportMetricsServiceRequest()
        points = 0
        now_ns = time.time_ns()
        for target in self.targets():
            try:
                resp = self._session.get(target.url, timeout=2)
                resp.raise_for_status()
            except requests.RequestException:
                continue  # a pod that went away; Prometheus would mark the target down
            resource, n = convert(resp.text, target, now_ns, self.start_ns)
            request.resource_metrics.append(resource)
            points += n
        if points:
            body = request.SerializeToString()
            self.forwarder.submit("metrics", body, "application/x-protobuf", None, points)
        return points


def interval_from_env() -> float:
    raw = os.environ.get(OTEL_METRIC_EXPORT_INTERVAL, "")
    try:
        return max(1.0, float(raw) / 1000) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S
