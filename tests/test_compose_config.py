"""What cannot run here is validated as far as it can be: the real compose file, the
Prometheus config and rules (promtool), every Envoy config the compose address plan
renders (envoy --mode validate), Grafana provisioning and dashboards cross-checked, and
the Collector pipelines against their own components."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
CONFIG = COMPOSE / "config"
GRAFANA = CONFIG / "grafana"


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    return subprocess.run(
        [str(binary), *args], cwd=COMPOSE, capture_output=True, text=True, timeout=60
    )


def test_compose_config_of_the_real_file() -> None:
    proc = _compose("-f", "docker-compose.yml", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    services = doc["services"]
    assert set(services) >= {
        "controlplane",
        "payments",
        "otel-collector",
        "tempo",
        "loki",
        "prometheus",
        "grafana",
    }
    for name, svc in services.items():
        assert svc.get("mem_limit"), f"{name} has no memory limit"
        assert ":latest" not in svc["image"] and ":" in svc["image"], svc["image"]
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)
        volumes = [v.get("target") for v in svc.get("volumes", [])]
        if "/var/run/docker.sock" in volumes:
            assert name == "controlplane", f"{name} mounts the engine socket"
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    # verify.py and the workflow reach Tempo and Loki's query APIs on loopback
    for name, port in (("tempo", 3200), ("loki", 3100), ("prometheus", 9090), ("grafana", 3000)):
        published = {
            (p["host_ip"], int(p["published"]), p["target"]) for p in services[name]["ports"]
        }
        assert ("127.0.0.1", port, port) in published, (name, published)
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]


def test_every_image_is_pinned_in_env() -> None:
    env = dict(
        line.split("=", 1)
        for line in (COMPOSE / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    images = {k: v for k, v in env.items() if k.endswith("_IMAGE")}
    assert len(images) >= 6
    for key, value in images.items():
        assert ":" in value and not value.endswith(":latest"), (key, value)


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (scripts/test installs Debian's prometheus as root)")
    return tool


PROMETHEUS3_SCRAPE_PROTOCOLS = {
    "PrometheusProto",
    "OpenMetricsText0.0.1",
    "OpenMetricsText1.0.0",
    "PrometheusText0.0.4",
    "PrometheusText1.0.0",
}
"""The scrape protocol names Prometheus 3 accepts in ``scrape_protocols``."""


def test_promtool_checks_config_and_rules(tmp_path: Path) -> None:
    """Debian's promtool (2.42) predates ``scrape_protocols``: that key is checked here
    against Prometheus 3's names, the rest of the file by promtool."""
    tool = _promtool()
    doc = yaml.safe_load((CONFIG / "prometheus.yml").read_text())
    protocols = doc["global"].pop("scrape_protocols")
    assert protocols[0] == "OpenMetricsText1.0.0", "exemplars need OpenMetrics first"
    assert set(protocols) <= PROMETHEUS3_SCRAPE_PROTOCOLS, protocols
    assert "PrometheusText0.0.4" in protocols, "plain-text targets (Envoy) must still scrape"
    rest = tmp_path / "prometheus.yml"
    rest.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        [tool, "check", "config", "--syntax-only", str(rest)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(
        [tool, "check", "rules", str(CONFIG / "rules.yml")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_envoy_configs_of_the_compose_plan_validate() -> None:
    """Rendered in a child process: the address plan is chosen at import time."""
    script = """
import json, sys
from mesh.model.controllers import Cluster
from mesh.model.manifests import default_manifest_paths, load_manifests
from mesh.envoy import render_ingress, render_sidecar, validate_config
cluster = Cluster()
cluster.apply(load_manifests(default_manifest_paths()))
state = cluster.state
otlp, logs = "http://10.244.1.252:4318", "10.244.1.252:4317"
configs = [render_ingress(state, otlp_endpoint=otlp, log_sink=logs)]
configs += [render_sidecar(p, state, otlp_endpoint=otlp, log_sink=logs) for p in state.pods[:3]]
assert "envoy.access_loggers.open_telemetry" in json.dumps(configs)
bad = [msg for ok, msg in map(validate_config, configs) if not ok]
print(json.dumps({"count": len(configs), "bad": bad}))
"""
    env = {**os.environ, "HOPSCOPE_ADDRESS_PLAN": "compose"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] == 4 and result["bad"] == [], result["bad"]


def _datasources() -> list[dict[str, Any]]:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "datasources.yml").read_text())
    return doc["datasources"]  # type: ignore[no-any-return]


def _dashboards() -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def test_grafana_datasources_are_linked_by_uid() -> None:
    sources = {d["uid"]: d for d in _datasources()}
    assert set(sources) == {"prometheus", "tempo", "loki"}
    tempo = sources["tempo"]["jsonData"]
    exemplars = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    # the label each source really writes: apps and kube-proxy trace_id, Tempo traceID
    assert {e["name"]: e["datasourceUid"] for e in exemplars} == {
        "trace_id": "tempo",
        "traceID": "tempo",
    }
    refs = [
        tempo["tracesToLogsV2"]["datasourceUid"],
        tempo["tracesToMetrics"]["datasourceUid"],
        tempo["serviceMap"]["datasourceUid"],
        *[f["datasourceUid"] for f in sources["loki"]["jsonData"]["derivedFields"]],
    ]
    assert refs == ["loki", "prometheus", "prometheus", "tempo"]
    derived = sources["loki"]["jsonData"]["derivedFields"][0]
    assert (derived["matcherType"], derived["matcherRegex"]) == ("label", "trace_id")


def _trace_to_logs_regex(trace_id_from_tempo: str) -> str:
    """The regex the Tempo datasource's logs link puts on Loki's trace_id, for an id."""
    import re

    template = next(d for d in _datasources() if d["uid"] == "tempo")["jsonData"]["tracesToLogsV2"][
        "query"
    ]
    # provisioning files expand $VARS: `$$` is a literal `$`
    query = template.replace("$$", "$").replace("${__trace.traceId}", trace_id_from_tempo)
    match = re.search(r'\|\s*trace_id\s*=~\s*"([^"]*)"', query)
    assert match, f"the trace-to-logs query does not match trace_id with a regex: {query}"
    assert "| json" not in query
    return match.group(1)


@pytest.mark.parametrize(
    "stored",
    ["000af7651916cd43dd8448eb211c8031", "4bf92f3577b34da6a3ce929d0e0e4736", "0" * 31 + "1"],
)
def test_trace_to_logs_link_survives_dropped_leading_zeros(stored: str) -> None:
    """Loki stores the 32-hex id; Tempo's search hands over the id without its leading
    zeros. LogQL regexes are anchored RE2, which Python's fullmatch mirrors here."""
    import re

    for as_tempo_gives_it in (stored.lstrip("0"), stored):
        regex = _trace_to_logs_regex(as_tempo_gives_it)
        assert re.fullmatch(regex, stored), (as_tempo_gives_it, regex)
        other = format(int(stored, 16) + 1, "032x")
        assert not re.fullmatch(regex, other), "the link must not match another trace"


def test_dashboards_reference_provisioned_datasources_and_are_current() -> None:
    uids = {d["uid"] for d in _datasources()}
    boards = _dashboards()
    assert {
        "start-here.json",
        "services.json",
        "kube-proxy.json",
        "envoy.json",
        "dns.json",
        "netpol.json",
    } <= set(boards)
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        assert board["panels"], name
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] in uids, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] in uids
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert (GRAFANA / "dashboards" / Path(home).name).exists()
    # the committed JSON is what the generator writes
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, runpy; m = runpy.run_path('compose/config/grafana/generate.py');"
            "print(json.dumps({k: v for k, v in m['DASHBOARDS'].items()}))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    generated = json.loads(proc.stdout)
    for name, body in generated.items():
        assert boards[f"{name}.json"] == body, (
            f"{name}.json is stale: run compose/config/grafana/generate.py"
        )


def test_only_the_histograms_with_exemplars_ask_for_them() -> None:
    """The apps' and kube-proxy's request durations carry ``trace_id`` exemplars (checked
    on a running cluster by tests/test_e2e_local.py); no other query asks for exemplars, and
    verify.py requires them on exactly these histograms."""
    with_exemplars = set(_verify().EXEMPLAR_HISTOGRAMS)
    asked = set()
    for name, board in _dashboards().items():
        for panel in board["panels"]:
            for target in panel["targets"]:
                carries = {h for h in with_exemplars if h in target.get("expr", "")}
                if target.get("exemplar"):
                    assert carries and panel["type"] == "timeseries", (name, panel["title"])
                    asked |= carries
                elif target["datasource"]["type"] == "prometheus":
                    assert not carries, f"{name} / {panel['title']}: exemplars not asked for"
    assert asked == with_exemplars


def _loss_panels() -> dict[str, dict[str, Any]]:
    board = _dashboards()["start-here.json"]
    return {p["title"]: p for p in board["panels"] if p["title"].startswith("Telemetry loss")}


LOSS_UNITS = {
    "spans": "suffix:spans/s",
    "log records": "suffix:log records/s",
    "Envoy span exports": "reqps",
    "OTLP requests": "reqps",
    "metric data points": "suffix:points/s",
}
"""Each loss panel (by the words after "Telemetry loss: ") and its one unit."""


def test_each_telemetry_loss_panel_has_one_unit_and_says_what_it_counts() -> None:
    """Spans, log records, export requests and metric data points are never drawn on one
    axis; each panel carries its unit and a description; the Envoy panel says that Envoy
    has no per-span counter for a failed export."""
    panels = _loss_panels()
    assert len(panels) == len(LOSS_UNITS), sorted(panels)
    for words, unit in LOSS_UNITS.items():
        (title,) = [t for t in panels if t.startswith(f"Telemetry loss: {words}")]
        panel = panels[title]
        assert panel["fieldConfig"] == {"defaults": {"unit": unit}, "overrides": []}, title
        assert panel["description"], title
    exprs = " ".join(t["expr"] for p in panels.values() for t in p["targets"])
    for metric in (
        "hopscope_otel_exported_spans_total",
        "hopscope_otel_exported_log_records_total",
        "envoy_cluster_upstream_rq_completed",
        "hopscope_otlp_receiver_requests_total",
        "hopscope_otlp_forwarded_items_total",
    ):
        assert metric in exprs, metric
    envoy = next(p for t, p in panels.items() if "Envoy span exports" in t)
    assert "no per-span counter" in envoy["description"]
    assert "spans_dropped" in envoy["description"]


SPANS = "hopscope_otel_exported_spans_total"
LOGS = "hopscope_otel_exported_log_records_total"
COMPLETED = "envoy_cluster_upstream_rq_completed"
RQ_XX = "envoy_cluster_upstream_rq_xx"
RECEIVER = "hopscope_otlp_receiver_requests_total"
FORWARDED = "hopscope_otlp_forwarded_items_total"
OTLP = 'envoy_cluster_name="hopscope_otlp"'
OK = f'{OTLP}, envoy_response_code_class="2"'
FRONTEND = 'job="apps", app="frontend"'

LOSS_SERIES = [
    # the labels Prometheus gives these series: the target's (job; for pods also app and
    # pod, from the control plane's discovery) plus the exposition's own
    (SPANS, f'{FRONTEND}, pod="frontend-1", outcome="failed"', "0+60x5"),
    (SPANS, f'{FRONTEND}, pod="frontend-2", outcome="failed"', "0+60x5"),
    (SPANS, f'{FRONTEND}, pod="frontend-1", outcome="sent"', "0+600x5"),
    (SPANS, 'job="kube-proxy", outcome="failed"', "0+120x5"),
    (SPANS, 'job="cni", outcome="dropped"', "0+0x5"),
    (LOGS, f'{FRONTEND}, pod="frontend-1", outcome="failed"', "0+30x5"),
    (LOGS, 'job="cni", outcome="failed"', "0+0x5"),
    # the ingress never had a 2xx from the receiver: it has no 2xx series at all
    (COMPLETED, f'job="envoy", pod="ingress-envoy", {OTLP}', "0+60x5"),
    (COMPLETED, f'job="envoy", pod="frontend-1", {OTLP}', "0+120x5"),
    (RQ_XX, f'job="envoy", pod="frontend-1", {OK}', "0+60x5"),
    (COMPLETED, f'job="envoy", pod="catalog-1", {OTLP}', "0+60x5"),
    (RQ_XX, f'job="envoy", pod="catalog-1", {OK}', "0+60x5"),
    (RECEIVER, 'job="controlplane", signal="traces", outcome="unavailable"', "0+60x5"),
    (RECEIVER, 'job="controlplane", signal="traces", outcome="accepted"', "0+600x5"),
    (FORWARDED, 'job="controlplane", signal="traces", outcome="failed"', "0+60x5"),
    (FORWARDED, 'job="controlplane", signal="logs", outcome="dropped"', "0+0x5"),
    (FORWARDED, 'job="controlplane", signal="metrics", outcome="failed"', "0+180x5"),
]
"""Counters as Prometheus stores them, rising per minute by the given step."""

LOSS_EXPECTED: dict[tuple[str, str], dict[str, float]] = {
    ("spans", "A"): {'{app="frontend", outcome="failed"}': 2},
    ("spans", "B"): {
        '{job="kube-proxy", outcome="failed"}': 2,
        '{job="cni", outcome="dropped"}': 0,
    },
    ("spans", "C"): {'{outcome="failed"}': 1},
    ("log records", "A"): {'{app="frontend", outcome="failed"}': 0.5},
    ("log records", "B"): {'{job="cni", outcome="failed"}': 0},
    ("log records", "C"): {'{outcome="dropped"}': 0},
    ("Envoy span exports", "A"): {
        '{pod="ingress-envoy"}': 1,
        '{pod="frontend-1"}': 1,
        '{pod="catalog-1"}': 0,
    },
    ("OTLP requests", "A"): {'{signal="traces", outcome="unavailable"}': 1},
    ("metric data points", "A"): {'{outcome="failed"}': 3},
}
"""Per loss panel and query: every series it must return (labels → per-second value)."""


def test_promtool_evaluates_every_telemetry_loss_query(tmp_path: Path) -> None:
    """Prometheus' own engine (promtool test rules) evaluates each loss query as the panel
    sends it: per component (the app, or the job of a system component), Envoy
    loss per pod (also for a pod that never got a 2xx back), and a 0 rather than nothing
    where nothing was lost."""
    tool = _promtool()
    panels = _loss_panels()
    tests = []
    for (words, ref), want in LOSS_EXPECTED.items():
        (panel,) = [p for t, p in panels.items() if t.startswith(f"Telemetry loss: {words}")]
        (target,) = [t for t in panel["targets"] if t["refId"] == ref]
        tests.append(
            {
                "expr": target["expr"],
                "eval_time": "5m",
                "exp_samples": [{"labels": k, "value": v} for k, v in want.items()],
            }
        )
    covered = {(w, r) for w, r in LOSS_EXPECTED}
    every = {
        (w, t["refId"])
        for w in LOSS_UNITS
        for title, p in panels.items()
        if title.startswith(f"Telemetry loss: {w}")
        for t in p["targets"]
    }
    assert covered == every, f"loss queries without an expectation: {sorted(every - covered)}"
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"{name}{{{labels}}}", "values": values}
                    for name, labels, values in LOSS_SERIES
                ],
                "promql_expr_test": tests,
            }
        ],
    }
    path = tmp_path / "loss-test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run(
        [tool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _env_images() -> dict[str, str]:
    lines = (COMPOSE / ".env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {k: v for k, v in env.items() if k.endswith("_IMAGE")}


def test_collector_pipelines_use_defined_components() -> None:
    doc = yaml.safe_load((CONFIG / "otel-collector.yaml").read_text())
    for name, pipeline in doc["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in doc[kind], (name, kind, component)
    for name in doc["exporters"]:
        # since 0.144 the exporters are otlp_grpc / otlp_http (otlp / otlphttp: deprecated)
        assert name.split("/")[0] in {"otlp_grpc", "otlp_http"}, name
    for name, exporter in doc["exporters"].items():
        assert exporter.get("compression") in {"gzip", "none", "zstd", "snappy"}, (
            f"{name} must state its compression"
        )
    traces = doc["service"]["pipelines"]["traces"]["exporters"]
    assert {"otlp_grpc/tempo", "otlp_http/hopscope"} <= set(traces)
    assert doc["exporters"]["otlp_http/hopscope"]["encoding"] == "proto"
    assert doc["service"]["pipelines"]["logs"]["exporters"] == ["otlp_http/loki"]
    assert doc["exporters"]["otlp_http/loki"]["endpoint"].endswith(":3100/otlp")
    version = _env_images()["OTELCOL_IMAGE"].rsplit(":", 1)[1]
    assert tuple(map(int, version.split("."))) >= (0, 144, 0), "otlp_grpc/otlp_http need 0.144+"


TEMPO3_REMOVED = {"ingester", "ingester_client", "compactor", "metrics_generator_client"}
"""Top-level blocks Tempo 3.0 removed (upgrade guide, monolithic migration)."""


def test_tempo_config_fits_the_pinned_major_version() -> None:
    assert _env_images()["TEMPO_IMAGE"].rsplit(":", 1)[1].split(".")[0] == "3"
    tempo = yaml.safe_load((CONFIG / "tempo.yaml").read_text())
    assert not TEMPO3_REMOVED & set(tempo), TEMPO3_REMOVED & set(tempo)
    generator = tempo["metrics_generator"]
    assert "traces_storage" not in generator, "only the removed local-blocks processor used it"
    assert "local_blocks" not in generator.get("processor", {})
    defaults = tempo["overrides"]["defaults"]
    processors = defaults["metrics_generator"]["processors"]
    assert set(processors) == {"service-graphs", "span-metrics"}, "local-blocks is gone in 3.0"
    # the scoped overrides format (Tempo 3 refuses the legacy flat one by default)
    assert not any(key.startswith("metrics_generator_") for key in defaults), defaults
    assert defaults["compaction"]["block_retention"], "retention is the compaction override"
    remote = generator["storage"]["remote_write"][0]
    assert remote["send_exemplars"] is True and remote["url"].endswith("/api/v1/write")
    otlp = tempo["distributor"]["receivers"]["otlp"]["protocols"]
    # Tempo's receivers listen on localhost unless told otherwise
    assert otlp["grpc"]["endpoint"].startswith("0.0.0.0:")


def test_loki_keeps_structured_metadata_and_really_deletes() -> None:
    assert _env_images()["LOKI_IMAGE"].rsplit(":", 1)[1].split(".")[0] == "3"
    loki = yaml.safe_load((CONFIG / "loki.yaml").read_text())
    assert loki["limits_config"]["allow_structured_metadata"] is True
    schema = loki["schema_config"]["configs"][-1]
    assert (schema["store"], schema["schema"]) == ("tsdb", "v13")
    # retention_period alone deletes nothing: the compactor must apply it
    compactor = loki["compactor"]
    assert compactor["retention_enabled"] is True
    assert compactor["delete_request_store"] == schema["object_store"]
    assert compactor["working_directory"]
    assert loki["limits_config"]["retention_period"]


# -- LogQL: every log query fits logs as Loki's OTLP ingestion stores them ----------------

LOG_LABELS = {"service_name", "k8s_namespace_name", "k8s_pod_name"}
"""Index labels Loki makes of the resource attributes (contract, section 2)."""

LOG_METADATA = {
    "log_kind",
    "direction",
    "response_code",
    "response_flags",
    "grpc_status",
    "upstream_host",
    "upstream_cluster",
    "method",
    "path",
    "authority",
    "duration_ms",
    "trace_id",
    "span_id",
    "code",  # the apps' RPC records (apps/common.py): OK or the gRPC status name
}
"""Structured metadata of the access and app records (contract, section 2)."""


def _logql_names(query: str) -> tuple[set[str], set[str]]:
    """(stream-selector labels, label-filter names) of a LogQL log query."""
    import re

    selector, _, pipeline = query.partition("}")
    stream = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', pipeline)
    filters = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|>=|<=|==|=|>|<)", without_strings))
    return stream, filters


def _log_queries() -> list[tuple[str, str]]:
    out = []
    for name, board in _dashboards().items():
        for panel in board["panels"]:
            for target in panel["targets"]:
                if target["datasource"]["type"] == "loki":
                    out.append((f"{name} / {panel['title']}", target["expr"]))
    tempo = next(d for d in _datasources() if d["uid"] == "tempo")["jsonData"]
    out.append(("Tempo trace-to-logs link", tempo["tracesToLogsV2"]["query"]))
    return out


def test_every_logql_query_uses_structured_metadata_not_json() -> None:
    queries = _log_queries()
    assert len(queries) >= 3
    for where, query in queries:
        assert "| json" not in query and "|json" not in query, f"{where}: {query}"
        assert query.count("(") == query.count(")"), f"{where}: unbalanced: {query}"
        stream, filters = _logql_names(query)
        assert stream and stream <= LOG_LABELS, f"{where}: stream labels {stream}"
        unknown = filters - LOG_METADATA - LOG_LABELS
        assert not unknown, f"{where}: filters on {sorted(unknown)}, not in the contract"


def test_failing_request_logs_include_grpc_failures_and_flags_skip_app_records() -> None:
    queries = dict(_log_queries())
    failing = next(q for w, q in queries.items() if "failing requests" in w)
    assert 'response_code=~"5.."' in failing
    assert 'grpc_status!=""' in failing and 'grpc_status!="0"' in failing
    assert 'code!="OK"' in failing
    flagged = next(q for w, q in queries.items() if "response flag" in w)
    assert 'log_kind="access"' in flagged and 'response_flags!="-"' in flagged


def test_trace_store_panel_uses_the_contract_metrics() -> None:
    exprs = " ".join(
        t.get("expr", "")
        for board in _dashboards().values()
        for panel in board["panels"]
        if panel["title"].startswith("Trace store")
        for t in panel["targets"]
    )
    for metric in (
        "hopscope_tracestore_traces",
        "hopscope_tracestore_spans",
        "hopscope_tracestore_bytes",
        "hopscope_tracestore_budget_bytes",
        "hopscope_tracestore_evicted_traces_total",
    ):
        assert metric in exprs, metric


# -- compose/verify.py: the bodies it sends for every panel --------------------------------


def _verify() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hopscope_verify", COMPOSE / "verify.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["hopscope_verify"] = module
    spec.loader.exec_module(module)
    return module


def _all_panel_queries() -> list[Any]:
    verify = _verify()
    now_ms = 1_800_000_000_000
    return [
        pq
        for board in _dashboards().values()
        for pq in verify.panel_queries(board, {}, now_ms, "now-15m")
    ]


def test_verify_builds_a_well_formed_query_for_every_panel() -> None:
    verify = _verify()
    uids = {d["uid"]: d["type"] for d in _datasources()}
    built = _all_panel_queries()
    panels = sum(len(b["panels"]) for b in _dashboards().values())
    assert len(built) == panels
    for pq in built:
        body = json.loads(json.dumps(pq.body))  # serializable as sent
        assert int(body["to"]) - int(body["from"]) == verify.duration_ms(
            verify.EMPTY_WINDOW if pq.empty_by_design else "now-15m"
        )
        assert body["queries"], pq.name
        for query in body["queries"]:
            ds = query["datasource"]
            assert uids.get(ds["uid"]) == ds["type"], f"{pq.name}: {ds} not provisioned"
            text = query.get("expr") or query.get("query")
            assert text and "$" not in text.replace("$$", ""), f"{pq.name}: {text!r}"
            assert query["refId"] and query["intervalMs"] > 0
            if ds["type"] == "loki":
                assert query["queryType"] == "range"
            if ds["type"] == "tempo":
                assert query["queryType"] == "traceql"
    refs = {
        (b["uid"], p["title"], t["refId"])
        for b in _dashboards().values()
        for p in b["panels"]
        for t in p.get("targets", [])
    }
    assert refs >= verify.EMPTY_BY_DESIGN, "a query empty by design is not on any dashboard"
    service_map = [pq for pq in built if "Service map" in pq.panel]
    assert service_map and all(
        q["datasource"]["uid"] == "prometheus" for q in service_map[0].body["queries"]
    )


def test_verify_checks_each_query_of_a_panel_on_its_own() -> None:
    """One empty or failing query fails its panel even when the panel's other queries have
    data; a query empty by design must stay empty."""
    verify = _verify()
    by_name = {pq.name: pq for pq in _all_panel_queries()}
    loss = next(pq for name, pq in by_name.items() if "Telemetry loss: spans" in name)
    refs = [q["refId"] for q in loss.body["queries"]]
    assert refs == ["A", "B", "C"] and not loss.empty_refs

    def frame(n: int) -> dict[str, Any]:
        return {"frames": [{"data": {"values": [list(range(n)), [0.0] * n]}}]}

    answer = {"results": {ref: frame(3) for ref in refs}}
    assert verify.query_failures(loss, answer) == ([], dict.fromkeys(refs, 3))
    answer["results"]["B"] = frame(0)
    failures, rows = verify.query_failures(loss, answer)
    assert failures == [f"panel {loss.name} [B]: no data"] and rows["A"] == 3
    answer["results"]["C"] = {"error": "parse error", "status": 400}
    del answer["results"]["A"]
    failures, _rows = verify.query_failures(loss, answer)
    assert [f.split("]: ")[1] for f in failures] == [
        "no result in Grafana's answer",
        "no data",
        "query error parse error",
    ]
    not_ready = by_name["Services and endpoints / Not-ready endpoints"]
    assert not_ready.empty_refs == {"A"}
    assert verify.query_failures(not_ready, {"results": {"A": frame(0)}}) == ([], {"A": 0})
    failures, _rows = verify.query_failures(not_ready, {"results": {"A": frame(2)}})
    assert failures == [f"panel {not_ready.name} [A]: empty by design, but returned 2 rows"]


def test_verify_substitutes_template_variables() -> None:
    verify = _verify()
    board = {
        "uid": "x",
        "title": "x",
        "templating": {
            "list": [
                {"name": "ns", "type": "custom", "current": {"value": "shop"}},
                {"name": "pods", "type": "query", "current": {"value": ["a", "b"]}},
            ]
        },
        "panels": [
            {
                "type": "timeseries",
                "title": "p",
                "targets": [
                    {
                        "refId": "A",
                        "datasource": {"type": "prometheus", "uid": "prometheus"},
                        "expr": 'rate(x{namespace="$ns", pod=~"${pods:regex}"}[$__rate_interval])',
                    }
                ],
            }
        ],
    }
    (pq,) = verify.panel_queries(board, {}, 1_800_000_000_000, "now-15m")
    assert pq.body["queries"][0]["expr"] == 'rate(x{namespace="shop", pod=~"a|b"}[60s])'
    assert verify.normalize_trace_id("000aB1") == verify.normalize_trace_id("ab1")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_every_promql_query_parses_in_a_real_prometheus(tmp_path: Path) -> None:
    """Every PromQL expression verify.py sends (panels and the service map), after
    variable substitution, through a real Prometheus' query API: a parse error is a 400."""
    import time

    import requests

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (scripts/test installs Debian's prometheus)")
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 15s}\n")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/-/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        exprs = {
            q["expr"]
            for pq in _all_panel_queries()
            for q in pq.body["queries"]
            if q["datasource"]["type"] == "prometheus"
        }
        assert len(exprs) > 20
        bad = []
        for expr in sorted(exprs):
            resp = requests.post(f"{base}/api/v1/query", data={"query": expr}, timeout=10)
            if resp.status_code != 200:
                bad.append(f"{expr}: {resp.json().get('error')}")
        assert not bad, "\n".join(bad)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- the GitHub workflow -------------------------------------------------------------------


def test_workflow_parses_every_step_can_fail_and_runs_verify() -> None:
    path = ROOT / ".github" / "workflows" / "compose-e2e.yml"
    doc = yaml.safe_load(path.read_text())
    steps = doc["jobs"]["compose"]["steps"]
    runs = [s["run"] for s in steps if "run" in s]
    assert runs
    for script in runs:
        assert "|| true" not in script and "|| :" not in script, script
        proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}\n{proc.stderr}"
        if "\n" in script.strip():
            assert "set -euo pipefail" in script, f"multi-line step without set -e:\n{script}"
    assert any("verify.py" in r for r in runs)
    assert any("--wait" in r and "up" in r for r in runs)
    down = next(s for s in steps if "compose down" in s.get("run", ""))
    assert down.get("if") == "always()"
