# ruff: noqa: E501
"""Write the hopscope Grafana dashboards (JSON) from this compact description.

    python compose/config/grafana/generate.py      # rewrites compose/config/grafana/dashboards/

Every Prometheus query uses only metrics the cluster itself emits (the test suite checks
that against a running cluster), so no panel is blank. Every LogQL query reads logs as Loki's
OTLP ingestion stores them: the record's attributes are structured metadata (``log_kind``,
``response_code``, ``response_flags``, ``grpc_status``…), filtered with label filters, never
parsed with ``| json`` (the bodies are plain messages). ``compose/verify.py`` runs every
panel's queries through Grafana against the running stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
PROM = {"type": "prometheus", "uid": "prometheus"}
TEMPO = {"type": "tempo", "uid": "tempo"}
LOKI = {"type": "loki", "uid": "loki"}


EXEMPLAR_HISTOGRAMS = (
    "hopscope_request_duration_seconds_bucket",
    "hopscope_kubeproxy_request_duration_seconds_bucket",
)
"""The histograms whose samples carry a ``trace_id`` exemplar (the apps' and kube-proxy's
request durations). Only queries of these ask Prometheus for exemplars; Envoy, CoreDNS,
kube-proxy's rule-sync histograms and every counter and gauge have none."""


def ts(
    title: str,
    queries: dict[str, str],
    unit: str = "short",
    w: int = 12,
    description: str = "",
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        **({"description": description} if description else {}),
        "datasource": PROM,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"w": w, "h": 8},
        "targets": [
            {
                "refId": chr(65 + i),
                "datasource": PROM,
                "expr": expr,
                "legendFormat": legend,
                "exemplar": any(name in expr for name in EXEMPLAR_HISTOGRAMS),
            }
            for i, (legend, expr) in enumerate(queries.items())
        ],
    }


def stat(title: str, expr: str, unit: str = "short") -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "datasource": PROM,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"w": 6, "h": 4},
        "targets": [{"refId": "A", "datasource": PROM, "expr": expr}],
    }


def traces(title: str, traceql: str) -> dict[str, Any]:
    return {
        "type": "table",
        "title": title,
        "datasource": TEMPO,
        "gridPos": {"w": 24, "h": 8},
        "targets": [
            {
                "refId": "A",
                "datasource": TEMPO,
                "queryType": "traceql",
                "query": traceql,
                "limit": 20,
            }
        ],
    }


def service_map() -> dict[str, Any]:
    return {
        "type": "nodeGraph",
        "title": "Service map (Tempo service graphs)",
        "datasource": TEMPO,
        "gridPos": {"w": 24, "h": 10},
        "targets": [{"refId": "A", "datasource": TEMPO, "queryType": "serviceMap"}],
    }


def logs(title: str, query: str) -> dict[str, Any]:
    return {
        "type": "logs",
        "title": title,
        "datasource": LOKI,
        "gridPos": {"w": 24, "h": 8},
        "targets": [{"refId": "A", "datasource": LOKI, "expr": query}],
    }


ALL_LOGS = '{service_name=~".+"}'
"""Every OTLP log stream (service_name is the label Loki makes of ``service.name``)."""

FAILING_REQUESTS = (
    ALL_LOGS + ' | (log_kind="access" and (response_code=~"5.." '
    'or (grpc_status!="" and grpc_status!="0"))) '
    'or (log_kind="app" and code!="" and code!="OK")'
)
"""Envoy access records of 5xx answers or failed gRPC calls (``grpc_status`` set and not 0,
whatever the HTTP status: a gRPC failure travels in HTTP 200), and app records of failed
RPCs (``code`` other than OK)."""

RESPONSE_FLAGGED = ALL_LOGS + ' | log_kind="access" | response_flags!="" | response_flags!="-"'
"""Envoy access records whose response flags say the proxy itself acted (UF, UT, NR, …)."""


INBOUND_ALL = 'envoy_http_downstream_cx_total{envoy_http_conn_manager_prefix=~"inbound_.*"}'
INBOUND_TLS = 'envoy_http_downstream_cx_ssl_total{envoy_http_conn_manager_prefix=~"inbound_.*"}'
"""A sidecar's inbound connection managers: every connection, and those that came in TLS."""


def _sdk_loss(metric: str, what: str) -> dict[str, str]:
    """Items a hopscope process's OpenTelemetry SDK did not send (``outcome`` failed or
    dropped): the apps by app name (job ``apps``), the system components by job."""
    lost = f'{metric}{{outcome!="sent"'
    return {
        f"{{{{app}}}} {what} {{{{outcome}}}}": f'sum by (app, outcome) (rate({lost}, job="apps"}}[1m]))',
        f"{{{{job}}}} {what} {{{{outcome}}}}": f'sum by (job, outcome) (rate({lost}, job!="apps"}}[1m]))',
    }


OTLP_EXPORTS_COMPLETED = 'sum by (pod) (rate(envoy_cluster_upstream_rq_completed{envoy_cluster_name="hopscope_otlp"}[1m]))'
OTLP_EXPORTS_2XX = 'sum by (pod) (rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="hopscope_otlp", envoy_response_code_class="2"}[1m]))'

TELEMETRY_LOSS: dict[str, dict[str, Any]] = {
    "Telemetry loss: spans not delivered, by component (0 = none)": {
        "unit": "suffix:spans/s",
        "queries": {
            **_sdk_loss("hopscope_otel_exported_spans_total", "spans"),
            "forwarded to your endpoint: spans {{outcome}}": 'sum by (outcome) (rate(hopscope_otlp_forwarded_items_total{signal="traces", outcome!="sent"}[1m]))',
        },
        "description": "Spans each hopscope process's OpenTelemetry SDK failed to export (the "
        "exporter gave up after its retries) or dropped (queue full), by component (app or "
        "system component); spans the receiver accepted but could not forward to your OTLP "
        "endpoint. Envoy does not count spans lost when an export fails: see the Envoy "
        "export panel.",
    },
    "Telemetry loss: log records not delivered, by component (0 = none)": {
        "unit": "suffix:log records/s",
        "queries": {
            **_sdk_loss("hopscope_otel_exported_log_records_total", "log records"),
            "forwarded to your endpoint: log records {{outcome}}": 'sum by (outcome) (rate(hopscope_otlp_forwarded_items_total{signal="logs", outcome!="sent"}[1m]))',
        },
        "description": "Log records each hopscope process's OTLP log handler failed to export "
        "or dropped, by component; log records the receiver could not forward to your OTLP "
        "endpoint.",
    },
    "Telemetry loss: Envoy span exports failed, by pod (requests/s)": {
        "unit": "reqps",
        "queries": {
            "{{pod}} export requests failed": f"{OTLP_EXPORTS_COMPLETED} - ({OTLP_EXPORTS_2XX} or {OTLP_EXPORTS_COMPLETED} * 0)",
        },
        "description": "Export requests from each Envoy (ingress and sidecars) to the OTLP "
        "receiver that did not end with a 2xx: refused connections, 5xx, timeouts. Each "
        "request carries the spans of one flush, so this counts requests, not spans. Envoy "
        "1.40 has no per-span counter for a failed export: "
        "tracing.opentelemetry.spans_sent counts spans handed to the exporter, whatever "
        "becomes of the export, and spans_dropped only spans its own buffer had no room "
        "for (max_cache_size), never a failed export.",
    },
    "Telemetry loss: OTLP requests the receiver refused or could not take (requests/s)": {
        "unit": "reqps",
        "queries": {
            "receiver {{signal}} requests {{outcome}}": 'sum by (signal, outcome) (rate(hopscope_otlp_receiver_requests_total{outcome!="accepted"}[1m]))',
        },
        "description": "OTLP export requests the receiver rejected (bad body) or answered "
        "while stopped (unavailable), by signal. Requests refused at connect time never "
        "reach it: the senders count those.",
    },
    "Telemetry loss: metric data points not forwarded to your endpoint": {
        "unit": "suffix:points/s",
        "queries": {
            "metric data points {{outcome}}": 'sum by (outcome) (rate(hopscope_otlp_forwarded_items_total{signal="metrics", outcome!="sent"}[1m]))',
        },
        "description": "Metric data points (from the Prometheus bridge) the receiver could not "
        "forward to your OTLP endpoint: failed after retries, or dropped (queue full).",
    },
}
"""Telemetry loss, each panel in one unit (spans, log records, export requests or metric
data points per second), each series by where the loss happens. Every hopscope process counts what its
OpenTelemetry SDK failed to send or dropped (``hopscope_otel_exported_*_total{outcome}``).
Envoy's tracer counts a span as ``spans_sent`` when it hands it to the exporter and its
``spans_dropped`` only when its buffer is full, so a failed export shows only on the OTLP
cluster, as export requests that did not complete with a 2xx (refused connections are 503s
there); a pod whose exports never succeeded has no 2xx series, hence the ``or … * 0``. The
receiver counts requests it refused or could not take (stopped), the forwarder items it
failed to deliver or dropped. Every series exists at 0, so each panel reads 0, not "no
data", when nothing is lost."""


def dashboard(
    uid: str, title: str, panels: list[dict[str, Any]], links: bool = True
) -> dict[str, Any]:
    x = y = 0
    row_h = 0
    for i, panel in enumerate(panels, 1):
        panel["id"] = i
        w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        panel["gridPos"].update({"x": x, "y": y})
        x += w
        row_h = max(row_h, h)
    return {
        "uid": uid,
        "title": title,
        "tags": ["hopscope"],
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-15m", "to": "now"},
        "timezone": "",
        "editable": False,
        "links": [
            {"type": "dashboards", "tags": ["hopscope"], "asDropdown": True, "title": "hopscope"}
        ]
        if links
        else [],
        "panels": panels,
    }


DASHBOARDS = {
    "start-here": dashboard(
        "hopscope-start",
        "Start here: the request journey",
        [
            ts(
                "Requests per app and status (the last hop)",
                {"{{app}} {{code}}": "sum by (app, code) (rate(hopscope_requests_total[1m]))"},
            ),
            ts(
                "App latency p95 per app",
                {
                    "{{app}}": "histogram_quantile(0.95, sum by (app, le) "
                    "(rate(hopscope_request_duration_seconds_bucket[1m])))"
                },
                unit="s",
            ),
            ts(
                "kube-proxy: connections DNATed per Service",
                {
                    "{{service}}": "sum by (service) (rate(hopscope_kubeproxy_connections_total[1m]))"
                },
            ),
            ts(
                "Envoy 5xx by hop (pod)",
                {
                    "{{pod}}": 'sum by (pod) (rate(envoy_http_downstream_rq_xx{envoy_response_code_class="5"}[1m]))'
                },
            ),
            traces(
                "Recent requests (open a trace: hops, logs, metrics)",
                '{ span.hopscope.hop = "client" }',
            ),
            service_map(),
            logs("Logs of failing requests (HTTP 5xx, gRPC errors)", FAILING_REQUESTS),
            ts(
                "Trace store: traces and spans held (hopscope trace, explorer)",
                {
                    "traces": "sum(hopscope_tracestore_traces)",
                    "spans": "sum(hopscope_tracestore_spans)",
                },
            ),
            ts(
                "Trace store: memory vs budget",
                {
                    "bytes held": "sum(hopscope_tracestore_bytes)",
                    "budget": "sum(hopscope_tracestore_budget_bytes)",
                },
                unit="bytes",
            ),
            ts(
                "Trace store: traces evicted to stay within budget",
                {
                    "evicted/s": "sum(rate(hopscope_tracestore_evicted_traces_total[1m]))",
                    "spans received/s": "sum(rate(hopscope_tracestore_spans_received_total[1m]))",
                },
            ),
            *(
                ts(title, panel["queries"], unit=panel["unit"], description=panel["description"])
                for title, panel in TELEMETRY_LOSS.items()
            ),
        ],
    ),
    "services": dashboard(
        "hopscope-services",
        "Services and endpoints",
        [
            ts(
                "Ready endpoints per Service",
                {
                    "{{namespace}}/{{service}}": "sum by (namespace, service) (hopscope_endpoint_ready)"
                },
            ),
            ts("Not-ready endpoints", {"{{service}} {{pod}}": "hopscope_endpoint_ready == 0"}),
            ts(
                "Endpoint choice per Service (connections per pod)",
                {
                    "{{service}} -> {{endpoint_pod}}": "sum by (service, endpoint_pod) (rate(hopscope_kubeproxy_connections_total[1m]))"
                },
                w=24,
            ),
            ts("Pods ready", {"{{pod}}": "hopscope_pod_ready"}, w=24),
        ],
    ),
    "kube-proxy": dashboard(
        "hopscope-kube-proxy",
        "kube-proxy",
        [
            ts(
                "Open connections (conntrack ESTABLISHED)",
                {"{{service}}": "sum by (service) (hopscope_kubeproxy_active_connections)"},
            ),
            ts(
                "Request duration through kube-proxy p99 (exemplars link to the trace)",
                {
                    "{{namespace}}/{{service}}": "histogram_quantile(0.99, sum by (le, namespace, "
                    "service) (rate(hopscope_kubeproxy_request_duration_seconds_bucket[1m])))"
                },
                unit="s",
            ),
            ts(
                "Refused connections by reason",
                {
                    "{{service}} {{reason}}": "sum by (service, reason) (rate(hopscope_kubeproxy_rejected_connections_total[1m]))"
                },
            ),
            ts(
                "Rule sync duration p99",
                {
                    "sync": "histogram_quantile(0.99, sum by (le) "
                    "(rate(kubeproxy_sync_proxy_rules_duration_seconds_bucket[5m])))"
                },
                unit="s",
            ),
            ts(
                "Network programming latency p99 (endpoint change to rules)",
                {
                    "programming": "histogram_quantile(0.99, sum by (le) "
                    "(rate(kubeproxy_network_programming_duration_seconds_bucket[5m])))"
                },
                unit="s",
            ),
            ts(
                "Bytes through DNAT per endpoint",
                {
                    "{{endpoint_pod}} {{direction}}": "sum by (endpoint_pod, direction) (rate(hopscope_kubeproxy_bytes_total[1m]))"
                },
                unit="Bps",
                w=24,
            ),
            stat(
                "Seconds since the last rule sync",
                "time() - kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                unit="s",
            ),
        ],
    ),
    "envoy": dashboard(
        "hopscope-envoy",
        "Envoy: ingress and sidecars",
        [
            ts(
                "Downstream responses by class and pod",
                {
                    "{{pod}} {{envoy_response_code_class}}xx": "sum by (pod, envoy_response_code_class) (rate(envoy_http_downstream_rq_xx[1m]))"
                },
                w=24,
            ),
            ts(
                "Upstream timeouts (UT) by cluster",
                {
                    "{{pod}} {{envoy_cluster_name}}": "sum by (pod, envoy_cluster_name) (rate(envoy_cluster_upstream_rq_timeout[1m]))"
                },
            ),
            ts(
                "Upstream connect failures (UF) by cluster",
                {
                    "{{pod}} {{envoy_cluster_name}}": "sum by (pod, envoy_cluster_name) (rate(envoy_cluster_upstream_cx_connect_fail[1m]))"
                },
            ),
            ts("Retries", {"{{pod}}": "sum by (pod) (rate(envoy_cluster_upstream_rq_retry[1m]))"}),
            ts(
                "Upstream health (healthy members)",
                {"{{pod}} {{envoy_cluster_name}}": "envoy_cluster_membership_healthy"},
            ),
            logs("Access logs with a response flag", RESPONSE_FLAGGED),
        ],
    ),
    "dns": dashboard(
        "hopscope-dns",
        "Cluster DNS",
        [
            ts(
                "Queries by type",
                {"{{type}}": "sum by (type) (rate(coredns_dns_requests_total[1m]))"},
            ),
            ts(
                "Responses by rcode",
                {"{{rcode}}": "sum by (rcode) (rate(coredns_dns_responses_total[1m]))"},
            ),
            ts(
                "Search-path waste: share of NXDOMAIN answers",
                {
                    "NXDOMAIN share": 'sum(rate(coredns_dns_responses_total{rcode="NXDOMAIN"}[5m])) / '
                    "sum(rate(coredns_dns_responses_total[5m]))"
                },
                unit="percentunit",
            ),
            ts(
                "Answer time p99",
                {
                    "p99": "histogram_quantile(0.99, sum by (le) "
                    "(rate(coredns_dns_request_duration_seconds_bucket[5m])))"
                },
                unit="s",
            ),
        ],
    ),
    "mesh": dashboard(
        "hopscope-mesh",
        "Mesh: mTLS, retries and canaries",
        [
            ts(
                "Inbound connections per pod: mTLS vs plaintext",
                {
                    "{{pod}} mTLS": f"sum by (pod) (rate({INBOUND_TLS}[1m]))",
                    "{{pod}} plaintext": f"sum by (pod) (rate({INBOUND_ALL}[1m])) - "
                    f"(sum by (pod) (rate({INBOUND_TLS}[1m])) or sum by (pod) (rate({INBOUND_ALL}[1m])) * 0)",
                },
                w=24,
            ),
            ts(
                "Handshake failures by reason (listener = callee's side, cluster = caller's side)",
                {
                    "{{pod}} plaintext refused: no filter chain (STRICT)": "sum by (pod) (rate(envoy_listener_no_filter_chain_match[1m]))",
                    "{{pod}} caller's certificate refused": "sum by (pod) (rate(envoy_listener_ssl_fail_verify_error[1m]))",
                    "{{pod}} caller sent no certificate": "sum by (pod) (rate(envoy_listener_ssl_fail_verify_no_cert[1m]))",
                    "{{pod}} TLS error as callee": "sum by (pod) (rate(envoy_listener_ssl_connection_error[1m]))",
                    "{{pod}} -> {{envoy_cluster_name}} callee's certificate refused": "sum by (pod, envoy_cluster_name) (rate(envoy_cluster_ssl_fail_verify_error[1m]))",
                    "{{pod}} -> {{envoy_cluster_name}} TLS error as caller": "sum by (pod, envoy_cluster_name) (rate(envoy_cluster_ssl_connection_error[1m]))",
                },
                w=24,
            ),
            ts(
                "Workload certificates: hours left (per sidecar)",
                {
                    "{{pod}}": 'min by (pod) (envoy_cluster_ssl_certificate_expiration_unix_time_seconds{envoy_tls_certificate="default"} - time()) / 3600'
                },
                unit="h",
            ),
            ts(
                "Retries by caller and Service",
                {
                    "{{pod}} -> {{envoy_cluster_name}}": 'sum by (pod, envoy_cluster_name) (rate(envoy_cluster_upstream_rq_retry{envoy_cluster_name=~"outbound.*"}[1m]))'
                },
            ),
            ts(
                "Circuit breaking: requests and connections refused (UO)",
                {
                    "{{pod}} -> {{envoy_cluster_name}} pending overflow": 'sum by (pod, envoy_cluster_name) (rate(envoy_cluster_upstream_rq_pending_overflow{envoy_cluster_name=~"outbound.*"}[1m]))',
                    "{{pod}} -> {{envoy_cluster_name}} connection overflow": 'sum by (pod, envoy_cluster_name) (rate(envoy_cluster_upstream_cx_overflow{envoy_cluster_name=~"outbound.*"}[1m]))',
                },
            ),
            ts(
                "Outlier detection: pods ejected from callers' load balancing",
                {
                    "{{pod}} -> {{envoy_cluster_name}} ejected now": 'sum by (pod, envoy_cluster_name) (envoy_cluster_outlier_detection_ejections_active{envoy_cluster_name=~"outbound.*"})',
                    "{{pod}} -> {{envoy_cluster_name}} ejections/s": 'sum by (pod, envoy_cluster_name) (rate(envoy_cluster_outlier_detection_ejections_enforced_total{envoy_cluster_name=~"outbound.*"}[1m]))',
                },
            ),
            ts(
                "Canary split: catalog calls per backend Service (callers' sidecars)",
                {
                    "{{envoy_cluster_name}}": 'sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_total{envoy_cluster_name=~"outbound.*catalog.*"}[1m]))'
                },
            ),
            traces("Calls over mTLS", '{ span.hopscope.tls.mode = "mtls" }'),
            traces(
                "Retried calls (a second try reached a pod)",
                '{ span.hopscope.retry.attempt = "2" }',
            ),
        ],
    ),
    "netpol": dashboard(
        "hopscope-netpol",
        "NetworkPolicy",
        [
            ts(
                "Denied connections by policy and side",
                {
                    "{{policy}} ({{side}})": "sum by (policy, side) (rate(hopscope_networkpolicy_denied_connections_total[1m]))"
                },
                w=24,
            ),
            ts(
                "Denied connections by destination pod",
                {
                    "{{namespace}}/{{pod}}": "sum by (namespace, pod) (increase(hopscope_networkpolicy_denied_connections_total[5m]))"
                },
                w=24,
            ),
        ],
    ),
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, body in DASHBOARDS.items():
        (OUT / f"{name}.json").write_text(json.dumps(body, indent=2) + "\n")
    print(f"wrote {len(DASHBOARDS)} dashboards to {OUT}")


if __name__ == "__main__":
    main()
