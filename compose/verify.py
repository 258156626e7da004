"""Check a running hopscope compose stack the way a user sees it, through Grafana.

    python compose/verify.py                     # after `docker compose up` and some traffic
    python compose/verify.py --timeout 60 --grafana http://127.0.0.1:3000

What it checks (each is retried until it holds or ``--timeout`` runs out):

* every provisioned datasource answers its health check;
* every panel of every provisioned dashboard: its queries, sent through Grafana's own query
  API (``/api/ds/query``) as the panel sends them (datasource, query, time range, template
  variables filled in), return data without error — each query (``refId``) on its own, so
  a mis-named query next to a working one fails. The queries listed in ``EMPTY_BY_DESIGN``
  must return nothing instead. The Tempo service-map panel is drawn by Grafana from
  Prometheus series, so its Prometheus queries are what is run for it;
* exemplars, by the label each source writes: the apps' and kube-proxy's request-duration
  histograms carry ``trace_id`` exemplars (``EXEMPLAR_HISTOGRAMS``: scraped as OpenMetrics,
  kept by ``exemplar-storage``), and one such trace is found by Tempo
  (``/api/traces/<id>``) and in Loki with the Tempo datasource's own trace-to-logs query,
  given the id as Tempo hands it over (leading zeros dropped). Separately, Tempo's own
  span metrics carry ``traceID`` exemplars that lead to a trace Tempo finds;
* the service-graph edges in ``EDGES`` exist in ``traces_service_graph_request_total``.

It prints a JSON summary and exits 1 with the list of what failed. Needs only the standard
library and ``requests``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

EMPTY_BY_DESIGN = {
    ("hopscope-services", "Not-ready endpoints", "A"),
}
"""(dashboard uid, panel title, refId) of the queries that must return nothing on a healthy
cluster. Every other query of every panel must return data."""

EMPTY_WINDOW = "now-2m"
"""Panels empty by design are checked over this recent window: a scenario that restarted a
pod earlier in the run legitimately had a not-ready endpoint for a moment."""

EDGES = [
    ("ingress", "frontend"),
    ("frontend", "catalog"),
    ("frontend", "reviews"),
    ("reviews", "ratings"),
    ("catalog", "cache"),
]
"""Service-graph edges (client, server) the request journey must produce."""

SERVICE_MAP_QUERIES = [
    "sum by (client, server) (rate(traces_service_graph_request_total[$__range]))",
    "sum by (client, server) (rate(traces_service_graph_request_server_seconds_sum[$__range]))",
]
"""What Grafana's Tempo service map asks Prometheus for (request rate and server time)."""

APP_EXEMPLAR_LABEL = "trace_id"
"""The exemplar label the apps and kube-proxy write (OpenMetrics exposition)."""

TEMPO_EXEMPLAR_LABEL = "traceID"
"""The exemplar label Tempo's metrics generator writes on its span metrics."""

EXEMPLAR_HISTOGRAMS = (
    "hopscope_request_duration_seconds_bucket",
    "hopscope_kubeproxy_request_duration_seconds_bucket",
)
"""Histograms that must carry ``trace_id`` exemplars: the apps' and kube-proxy's."""


# -- building the queries a panel sends ------------------------------------------------


def duration_ms(spec: str) -> int:
    """``15m`` → 900000; ``now-15m`` is read as its duration."""
    spec = spec.removeprefix("now-")
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", spec)
    if not match:
        raise ValueError(f"unsupported duration {spec!r} (use e.g. 30s, 15m, 1h)")
    unit = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[match.group(2)]
    return int(match.group(1)) * unit


def builtin_variables(range_ms: int, interval_ms: int) -> dict[str, str]:
    """Grafana's global variables for a time range and a query interval."""
    rate = max(4 * interval_ms, 60_000)  # $__rate_interval: at least four scrape intervals
    return {
        "__range": f"{range_ms // 1000}s",
        "__range_s": str(range_ms // 1000),
        "__range_ms": str(range_ms),
        "__interval": f"{interval_ms // 1000}s",
        "__interval_ms": str(interval_ms),
        "__rate_interval": f"{rate // 1000}s",
    }


def substitute(text: str, values: dict[str, str]) -> str:
    """Fill ``$var``, ``${var}``, ``${var:fmt}`` and ``[[var]]``; unknown names stay."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        return values.get(name, match.group(0))

    pattern = r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)"
    return re.sub(pattern, repl, text)


def dashboard_variables(board: dict[str, Any]) -> dict[str, str]:
    """The values a dashboard's own template variables have when it opens."""
    values: dict[str, str] = {}
    for var in board.get("templating", {}).get("list", []):
        current = var.get("current") or {}
        value = current.get("value")
        if value is None and var.get("options"):
            value = var["options"][0].get("value")
        if isinstance(value, list):
            value = "|".join(str(v) for v in value)
        if value is not None:
            values[var["name"]] = str(value)
    return values


@dataclass
class PanelQuery:
    """One request a panel makes through ``/api/ds/query``."""

    dashboard: str
    panel: str
    body: dict[str, Any]
    empty_refs: set[str] = field(default_factory=set)
    datasource_uids: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel}"

    @property
    def empty_by_design(self) -> bool:
        """A query of this panel must return nothing (checked over ``EMPTY_WINDOW``)."""
        return bool(self.empty_refs)


def _target_query(
    target: dict[str, Any], values: dict[str, str], interval_ms: int
) -> dict[str, Any]:
    ds = target["datasource"]
    query: dict[str, Any] = {
        "refId": target.get("refId", "A"),
        "datasource": {"type": ds["type"], "uid": ds["uid"]},
        "intervalMs": interval_ms,
        "maxDataPoints": 500,
    }
    if ds["type"] == "prometheus":
        query.update(
            expr=substitute(target["expr"], values),
            range=True,
            instant=False,
            exemplar=bool(target.get("exemplar")),
            legendFormat=target.get("legendFormat", ""),
        )
    elif ds["type"] == "loki":
        query.update(
            expr=substitute(target["expr"], values),
            queryType="range",
            maxLines=int(target.get("maxLines", 100)),
        )
    elif ds["type"] == "tempo":
        query.update(
            queryType=target.get("queryType", "traceql"),
            query=substitute(target.get("query", ""), values),
            limit=int(target.get("limit", 20)),
            tableType="traces",
        )
    else:
        raise ValueError(f"panel datasource type {ds['type']!r} is not one verify.py knows")
    return query


def panel_queries(
    board: dict[str, Any],
    variables: dict[str, str],
    now_ms: int,
    window: str = "now-15m",
    empty_window: str = EMPTY_WINDOW,
    service_map_uid: str = "prometheus",
) -> list[PanelQuery]:
    """Every ``/api/ds/query`` body the dashboard's panels send when it opens.

    ``service_map_uid`` is the Tempo datasource's ``serviceMap.datasourceUid``: the
    Prometheus a service-map panel is drawn from."""
    out = []
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            continue
        empty = {
            ref
            for uid, title, ref in EMPTY_BY_DESIGN
            if (uid, title) == (board["uid"], panel["title"])
        }
        range_ms = duration_ms(empty_window if empty else window)
        interval_ms = max(range_ms // 500, 5_000)
        values = {
            **builtin_variables(range_ms, interval_ms),
            **dashboard_variables(board),
            **variables,
        }
        span = {"from": str(now_ms - range_ms), "to": str(now_ms)}
        targets = panel.get("targets", [])
        queries: list[dict[str, Any]]
        if targets and all(t.get("queryType") == "serviceMap" for t in targets):
            prom = {"type": "prometheus", "uid": service_map_uid}
            queries = [
                {
                    "refId": chr(65 + i),
                    "datasource": prom,
                    "expr": substitute(expr, values),
                    "instant": True,
                    "range": False,
                    "intervalMs": interval_ms,
                    "maxDataPoints": 500,
                }
                for i, expr in enumerate(SERVICE_MAP_QUERIES)
            ]
        else:
            queries = [_target_query(t, values, interval_ms) for t in targets]
        uids = {q["datasource"]["uid"] for q in queries}
        out.append(
            PanelQuery(board["title"], panel["title"], {**span, "queries": queries}, empty, uids)
        )
    return out


def query_failures(pq: PanelQuery, doc: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """Each query (``refId``) of one panel's ``/api/ds/query`` answer, on its own: an error,
    no rows (unless empty by design) or rows where none are wanted fail. Rows per refId."""
    results = doc.get("results", {}) or {}
    failures, rows = [], {}
    for query in pq.body["queries"]:
        ref = query["refId"]
        result = results.get(ref)
        if result is None:
            failures.append(f"panel {pq.name} [{ref}]: no result in Grafana's answer")
            continue
        if result.get("error") or int(result.get("status", 200)) >= 400:
            error = result.get("error") or result.get("status")
            failures.append(f"panel {pq.name} [{ref}]: query error {error}")
            continue
        rows[ref] = frame_rows(result)
        if ref in pq.empty_refs and rows[ref]:
            failures.append(
                f"panel {pq.name} [{ref}]: empty by design, but returned {rows[ref]} rows"
            )
        elif ref not in pq.empty_refs and not rows[ref]:
            failures.append(f"panel {pq.name} [{ref}]: no data")
    return failures, rows


def frame_rows(result: dict[str, Any]) -> int:
    """Rows across a ``/api/ds/query`` result's data frames."""
    rows = 0
    for frame in result.get("frames", []) or []:
        values = frame.get("data", {}).get("values") or []
        if values:
            rows += len(values[0])
    return rows


def normalize_trace_id(trace_id: str) -> str:
    """The same trace, whatever the shape: lowercase, no leading zeros."""
    return trace_id.strip().lower().lstrip("0")


# -- talking to the stack ----------------------------------------------------------------


class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.grafana = args.grafana.rstrip("/")
        self.tempo = args.tempo.rstrip("/")
        self.loki = args.loki.rstrip("/")
        self.prometheus = args.prometheus.rstrip("/")
        self.http = requests.Session()
        if args.password:
            self.http.auth = (args.user, args.password)
        self.window = args.window

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            return self.http.request(method, url, timeout=60, **kwargs)
        except requests.ConnectionError:
            raise RuntimeError(f"cannot reach {url.split('?')[0]} (connection refused)") from None
        except requests.Timeout:
            raise RuntimeError(f"{url.split('?')[0]} did not answer in 60 s") from None

    def get(self, url: str, **params: Any) -> Any:
        resp = self._send("GET", url, params=params)
        if resp.status_code >= 400:
            raise RuntimeError(f"GET {url}: HTTP {resp.status_code} {resp.text[:200]}")
        try:
            return resp.json()
        except ValueError:
            raise RuntimeError(f"GET {url}: not JSON: {resp.text[:100]!r}") from None

    def ds_query(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = self._send("POST", f"{self.grafana}/api/ds/query", json=body)
        try:
            doc: dict[str, Any] = resp.json()
        except ValueError:
            raise RuntimeError(
                f"/api/ds/query: HTTP {resp.status_code} {resp.text[:200]}"
            ) from None
        if resp.status_code >= 400 and "results" not in doc:
            raise RuntimeError(f"/api/ds/query: HTTP {resp.status_code} {doc.get('message')}")
        return doc


def check_datasources(stack: Stack) -> list[str]:
    failures = []
    for ds in stack.get(f"{stack.grafana}/api/datasources"):
        try:
            health = stack.get(f"{stack.grafana}/api/datasources/uid/{ds['uid']}/health")
        except RuntimeError as exc:
            failures.append(f"datasource {ds['uid']}: health check failed: {exc}")
            continue
        if str(health.get("status", "")).upper() != "OK":
            failures.append(f"datasource {ds['uid']}: {health.get('message', health)}")
    return failures


def provisioned_dashboards(stack: Stack) -> list[dict[str, Any]]:
    found = stack.get(f"{stack.grafana}/api/search", type="dash-db", limit=5000)
    if not found:
        raise RuntimeError("Grafana has no dashboards provisioned")
    return [
        stack.get(f"{stack.grafana}/api/dashboards/uid/{hit['uid']}")["dashboard"] for hit in found
    ]


def resolve_query_variables(stack: Stack, board: dict[str, Any]) -> dict[str, str]:
    """Query variables (``label_values(metric, label)``) resolved to their first value."""
    values = {}
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") != "query" or not isinstance(query, str):
            continue
        match = re.fullmatch(r"\s*label_values\((?:(.+),\s*)?(\w+)\)\s*", query)
        if not match:
            continue
        params = {"match[]": match.group(1)} if match.group(1) else {}
        got = stack.get(f"{stack.prometheus}/api/v1/label/{match.group(2)}/values", **params)
        if got.get("data"):
            values[var["name"]] = got["data"][0]
    return values


def check_panels(stack: Stack, summary: dict[str, Any]) -> list[str]:
    tempo = stack.get(f"{stack.grafana}/api/datasources/uid/tempo")
    service_map_uid = tempo.get("jsonData", {}).get("serviceMap", {}).get("datasourceUid", "")
    failures = []
    now_ms = int(time.time() * 1000)
    panels = summary.setdefault("panels", {})
    for board in provisioned_dashboards(stack):
        variables = resolve_query_variables(stack, board)
        for pq in panel_queries(
            board, variables, now_ms, stack.window, service_map_uid=service_map_uid
        ):
            try:
                doc = stack.ds_query(pq.body)
            except RuntimeError as exc:
                failures.append(f"panel {pq.name}: {exc}")
                panels[pq.name] = "error"
                continue
            failed, rows = query_failures(pq, doc)
            panels[pq.name] = rows
            failures += failed
    return failures


def exemplar_trace_ids(stack: Stack, query: str, label: str, start: int, end: int) -> list[str]:
    """Trace ids of the exemplars of ``query``'s series under ``label``, newest first."""
    got = stack.get(f"{stack.prometheus}/api/v1/query_exemplars", query=query, start=start, end=end)
    found = sorted(
        (
            (float(ex.get("timestamp", 0)), ex["labels"][label])
            for series in got.get("data", []) or []
            for ex in series.get("exemplars", []) or []
            if ex.get("labels", {}).get(label)
        ),
        reverse=True,
    )
    return list(dict.fromkeys(tid for _ts, tid in found))


def logs_of_trace(stack: Stack, template: str, as_given: str, start: int, end: int) -> int:
    """Log lines Loki finds with the Tempo datasource's trace-to-logs query."""
    query = template.replace("${__trace.traceId}", as_given)
    got = stack.get(
        f"{stack.loki}/loki/api/v1/query_range",
        query=query,
        start=start * 10**9,
        end=end * 10**9,
        limit=20,
    )
    return sum(len(s.get("values", [])) for s in got.get("data", {}).get("result", []))


def tempo_has_trace(stack: Stack, trace_id: str) -> bool:
    resp = stack._send("GET", f"{stack.tempo}/api/traces/{trace_id}")
    if resp.status_code == 404:
        return False
    if resp.status_code >= 400:
        raise RuntimeError(f"Tempo /api/traces/{trace_id}: HTTP {resp.status_code}")
    return True


def check_trace_links(stack: Stack, summary: dict[str, Any]) -> list[str]:
    """Exemplars by the label each source writes, and the trace and logs they lead to."""
    end = int(time.time())
    start = end - duration_ms(stack.window) // 1000
    failures = []
    info: dict[str, Any] = summary.setdefault("exemplars", {})
    # the apps' and kube-proxy's own exemplars: scraped (OpenMetrics), stored, labelled trace_id
    ids: list[str] = []
    for histogram in EXEMPLAR_HISTOGRAMS:
        got = exemplar_trace_ids(stack, histogram, APP_EXEMPLAR_LABEL, start, end)
        info[histogram] = len(got)
        if not got:
            failures.append(
                f"exemplars: no {APP_EXEMPLAR_LABEL!r} exemplar on {histogram} in Prometheus"
            )
        ids += [tid for tid in got[:10] if tid not in ids]
    if ids:
        tempo_ds = stack.get(f"{stack.grafana}/api/datasources/uid/tempo")
        template = tempo_ds["jsonData"]["tracesToLogsV2"]["query"]
        in_tempo = 0
        ids.sort(key=lambda tid: not tid.startswith("0"))  # ids a naive link loses, first
        for tid in ids[:20]:
            if not tempo_has_trace(stack, tid):
                continue
            in_tempo += 1
            as_given = normalize_trace_id(tid)  # the shape Tempo hands the link
            lines = logs_of_trace(stack, template, as_given, start, end)
            if lines:
                summary["trace"] = {
                    "exemplar_trace_id": tid,
                    "id_given_to_logs_query": as_given,
                    "leading_zeros_dropped": len(as_given) < len(tid),
                    "log_lines": lines,
                    "logs_query": template.replace("${__trace.traceId}", as_given),
                }
                break
        else:
            failures.append(
                f"exemplars: of {min(len(ids), 20)} {APP_EXEMPLAR_LABEL!r} exemplar traces, "
                f"{in_tempo} are in Tempo and none has logs found by the Tempo datasource's "
                f"logs query ({template})"
            )
    # Tempo's span-metrics exemplars, checked on their own: the link leads to a stored trace
    tempo_ids = exemplar_trace_ids(
        stack, '{__name__=~"traces_.+_bucket"}', TEMPO_EXEMPLAR_LABEL, start, end
    )
    info["tempo_span_metrics"] = len(tempo_ids)
    if not tempo_ids:
        failures.append(
            f"exemplars: no {TEMPO_EXEMPLAR_LABEL!r} exemplar on Tempo's span metrics "
            "(traces_*_bucket) in Prometheus"
        )
    elif not any(tempo_has_trace(stack, tid) for tid in tempo_ids[:20]):
        failures.append(
            f"exemplars: none of {min(len(tempo_ids), 20)} {TEMPO_EXEMPLAR_LABEL!r} "
            "exemplar traces of Tempo's span metrics is found by Tempo"
        )
    return failures


def check_service_graph(stack: Stack, summary: dict[str, Any]) -> list[str]:
    got = stack.get(
        f"{stack.prometheus}/api/v1/query",
        query="sum by (client, server) (traces_service_graph_request_total)",
    )
    edges = {
        (r["metric"].get("client", ""), r["metric"].get("server", ""))
        for r in got.get("data", {}).get("result", [])
    }
    summary["service_graph_edges"] = sorted(f"{c}->{s}" for c, s in edges)
    return [
        f"service graph: no edge {client} -> {server} in traces_service_graph_request_total"
        for client, server in EDGES
        if (client, server) not in edges
    ]


def run_checks(stack: Stack) -> tuple[list[str], dict[str, Any]]:
    summary: dict[str, Any] = {}
    failures: list[str] = []
    for name, check in (
        ("datasources", lambda: check_datasources(stack)),
        ("panels", lambda: check_panels(stack, summary)),
        ("trace_links", lambda: check_trace_links(stack, summary)),
        ("service_graph", lambda: check_service_graph(stack, summary)),
    ):
        try:
            failures += check()
        except (RuntimeError, requests.RequestException, KeyError, ValueError) as exc:
            failures.append(f"{name}: {exc}")
    return failures, summary


def _password_from_env_file() -> str:
    """``GRAFANA_ADMIN_PASSWORD`` from the ``.env`` next to this script, as compose reads it."""
    try:
        lines = (Path(__file__).resolve().parent / ".env").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "GRAFANA_ADMIN_PASSWORD":
            return value.strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grafana", default="http://127.0.0.1:3000")
    parser.add_argument("--tempo", default="http://127.0.0.1:3200")
    parser.add_argument("--loki", default="http://127.0.0.1:3100")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--user", default="admin", help="Grafana user (with --password)")
    parser.add_argument(
        "--password",
        default=os.environ.get("GRAFANA_ADMIN_PASSWORD") or _password_from_env_file(),
        help="Grafana admin password (default: $GRAFANA_ADMIN_PASSWORD, else compose/.env)",
    )
    parser.add_argument("--window", default="now-15m", help="time range of every panel")
    parser.add_argument(
        "--timeout", type=float, default=300, help="retry failing checks this many seconds"
    )
    args = parser.parse_args(argv)
    try:
        duration_ms(args.window)
    except ValueError as exc:
        parser.error(str(exc))
    stack = Stack(args)
    deadline = time.monotonic() + args.timeout
    attempt = 0
    while True:
        attempt += 1
        failures, summary = run_checks(stack)
        if not failures or time.monotonic() >= deadline:
            break
        print(f"attempt {attempt}: {len(failures)} checks failing, retrying", file=sys.stderr)
        time.sleep(10)
    summary.update(ok=not failures, attempts=attempt, failures=failures)
    print(json.dumps(summary, indent=2, sort_keys=True))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
