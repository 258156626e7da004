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


def test_promtool_checks_config_and_rules() -> None:
    tool = _promtool()
    proc = subprocess.run(
        [tool, "check", "config", "--syntax-only", str(CONFIG / "prometheus.yml")],
        capture_output=True,
        text=True,
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
    refs = [
        sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"][0]["datasourceUid"],
        tempo["tracesToLogsV2"]["datasourceUid"],
        tempo["tracesToMetrics"]["datasourceUid"],
        tempo["serviceMap"]["datasourceUid"],
        *[f["datasourceUid"] for f in sources["loki"]["jsonData"]["derivedFields"]],
    ]
    assert refs == ["tempo", "loki", "prometheus", "prometheus", "tempo"]
    assert sources["loki"]["jsonData"]["derivedFields"][0]["name"] == "trace_id"


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


def test_collector_pipelines_use_defined_components() -> None:
    doc = yaml.safe_load((CONFIG / "otel-collector.yaml").read_text())
    for name, pipeline in doc["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in doc[kind], (name, kind, component)
    assert "otlp/tempo" in doc["service"]["pipelines"]["traces"]["exporters"]
    assert "otlphttp/loki" in doc["service"]["pipelines"]["logs"]["exporters"]
    tempo = yaml.safe_load((CONFIG / "tempo.yaml").read_text())
    processors = tempo["overrides"]["defaults"]["metrics_generator"]["processors"]
    assert {"service-graphs", "span-metrics"} <= set(processors)
    assert tempo["metrics_generator"]["storage"]["remote_write"][0]["send_exemplars"] is True
    loki = yaml.safe_load((CONFIG / "loki.yaml").read_text())
    assert loki["limits_config"]["allow_structured_metadata"] is True
    assert loki["schema_config"]["configs"][0]["schema"] == "v13"
