"""The processes' span export set-up (:mod:`telemetry.tracing`)."""

from __future__ import annotations

import http.server
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from telemetry.export_counts import ExportCounters
from telemetry.tracing import OTEL_EXPORTER_OTLP_ENDPOINT, setup_tracing
from tests.http_stub import serving


class _Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    paths: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture()
def receiver() -> Iterator[http.server.ThreadingHTTPServer]:
    _Receiver.paths = []
    with serving(_Receiver) as server:
        yield server


def test_spans_reach_the_clusters_receiver_whatever_proxy_the_environment_names(
    receiver: http.server.ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a proxy nobody listens on (the discard port): a request sent through it would fail
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(OTEL_EXPORTER_OTLP_ENDPOINT, f"http://127.0.0.1:{receiver.server_port}")
    counters = ExportCounters(CollectorRegistry())
    provider = setup_tracing("probe", set_global=False, counters=counters)
    with provider.get_tracer("t").start_as_current_span("work"):
        pass
    assert provider.force_flush(5_000)
    provider.shutdown()
    assert _Receiver.paths == ["/v1/traces"]
