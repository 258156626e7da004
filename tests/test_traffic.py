"""The open-model generator against a real local HTTP server (no cluster needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import uvloop
from opentelemetry.sdk.trace import TracerProvider

from mesh.traffic.engine import Generator, Route, Target, summarize

ADDRESS = ("127.0.0.1", 19190)


class _Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay = 0.0

    def do_GET(self) -> None:
        time.sleep(type(self).delay)
        status = 500 if self.path == "/fail" else 200
        self.send_response(status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[type[_Slow]]:
    srv = ThreadingHTTPServer(ADDRESS, _Slow)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield _Slow
    srv.shutdown()


def _gen(rps: float, seconds: float, concurrency: int, path: str) -> Generator:
    target = Target(*ADDRESS, "x", "127.0.0.1", "test", fixed_path=path)
    tracer = TracerProvider().get_tracer("test")
    return Generator(target, rps, seconds, concurrency, tracer, mix=(Route(1, "GET", path, "t"),))


def test_latency_counts_from_the_intended_send_time(server: type[_Slow]) -> None:
    """One slot, 100 ms per request, 20 requests due within 1 s: the queue must show."""
    server.delay = 0.1
    gen = _gen(20, 1.0, 1, "/")
    stats = uvloop.run(gen.run())
    summary = summarize(gen)
    assert stats.done == 20 and summary["status_codes"] == {"200": 20}
    # the last request was due at 0.95 s but could only start at ~1.9 s
    assert summary["latency_ms"]["max"] > 800, summary["latency_ms"]
    assert summary["latency_ms"]["p50"] > 300
    assert stats.waited_for_slot > 0
    server.delay = 0.0


def test_failures_and_rate(server: type[_Slow]) -> None:
    gen = _gen(50, 1.0, 8, "/fail")
    uvloop.run(gen.run())
    summary = summarize(gen)
    assert summary["failures"] == 50 and summary["status_codes"] == {"500": 50}
    assert 40 <= summary["achieved_rps"] <= 60
    assert len(summary["failing_traces"]) == 10
    assert all(len(t["trace_id"]) == 32 for t in summary["failing_traces"])


def test_cli_json_summary(server: type[_Slow]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "traffic",
            "--json",
            "--rps",
            "40",
            "--duration",
            "1",
            "--target",
            f"http://{ADDRESS[0]}:{ADDRESS[1]}/items",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": "", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["requests"] == 40 and summary["routes"] == {"/items": 40}
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "max"}
    bad = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "traffic", "--rps", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--rps" in bad.stderr


def _cli_traffic(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "traffic", "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": "", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_a_lagging_target_is_called_out(server: type[_Slow]) -> None:
    """One slot and 100 ms a request: at most 10 req/s, asked for 30 — the summary says so."""
    server.delay = 0.1
    try:
        url = f"http://{ADDRESS[0]}:{ADDRESS[1]}/items"
        lagging = _cli_traffic(
            "--rps", "30", "--duration", "3", "--concurrency", "1", "--target", url
        )
    finally:
        server.delay = 0.0
    capacity = lagging["capacity"]
    assert capacity["kept_up"] is False, lagging
    assert "not keeping up" in capacity["warning"] and "of 30 req/s" in capacity["warning"]
    fine = _cli_traffic("--rps", "20", "--duration", "3", "--target", url)
    assert fine["capacity"]["kept_up"] is True and fine["capacity"]["warning"] is None


def test_processes_map_to_cluster_components() -> None:
    from mesh.envoy import envoy_command
    from mesh.traffic.capacity import component_of

    python = sys.executable
    assert component_of([python, "-m", "mesh.kubeproxy", "--node", "node-a"]) == "kube-proxy"
    assert component_of([python, "-m", "mesh.cni.internet", "--port", "8080"]) == "internet"
    assert component_of([python, "-m", "mesh.cni"]) == "cni"
    assert component_of([python, "-m", "mesh.dns"]) == "cluster-dns"
    assert component_of([python, "-m", "mesh.controlplane", "-f", "x"]) == "control plane"
    assert component_of([python, "-m", "apps.frontend"]) == "frontend"
    from pathlib import Path

    argv = envoy_command(Path("/tmp/x.json"), service_node="n", service_cluster="c")
    assert component_of(argv) == "envoy"
