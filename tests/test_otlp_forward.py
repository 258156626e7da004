"""Forwarding to the user's own OTLP endpoint: traces, logs and metrics arrive, headers go
along, failures and overflow are counted.

The "user's backend" is a small real OTLP/HTTP server started here, decoding with
opentelemetry-proto; everything on hopscope's side is the real pipeline on real sockets.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
import requests
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mesh.otlp.forward import Forwarder, parse_headers
from mesh.otlp.pipeline import TelemetryPipeline
from mesh.otlp.prom_bridge import Target, convert
from mesh.tracestore.store import TraceStore
from telemetry.tracing import setup_tracing

DECODERS: dict[str, Any] = {
    "/v1/traces": ExportTraceServiceRequest,
    "/v1/logs": ExportLogsServiceRequest,
    "/v1/metrics": ExportMetricsServiceRequest,
}


class Backend:
    """A minimal OTLP/HTTP receiver standing in for the user's stack."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[str, dict[str, str], Any]] = []
        self.fail_first = fail_first
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if backend.fail_first > 0:
                    backend.fail_first -= 1
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                message = DECODERS[self.path]()
                message.ParseFromString(body)
                backend.received.append((self.path, dict(self.headers), message))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, path: str) -> list[Any]:
        return [m for p, _h, m in self.received if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


def _wait(condition: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met")


def _count(registry: CollectorRegistry, signal: str, outcome: str) -> float:
    value = registry.get_sample_value(
        "hopscope_otlp_forwarded_items_total", {"signal": signal, "outcome": outcome}
    )
    assert value is not None
    return value


def test_traces_and_logs_reach_the_store_and_the_users_endpoint(backend: Backend) -> None:
    registry = CollectorRegistry()
    store = TraceStore(16 * 2**20)
    pipe = TelemetryPipeline(
        store,
        registry,
        host="127.0.0.1",
        port=0,
        forward_endpoint=backend.url + "/",
        forward_headers=parse_headers("x-scope-orgid=tenant%201,authorization=Bearer abc"),
    )
    pipe.start()
    try:
        provider = setup_tracing(
            "fwd-test",
            exporter=OTLPSpanExporter(endpoint=f"{pipe.url}/v1/traces", timeout=2),
            set_global=False,
        )
        with provider.get_tracer("t").start_as_current_span("hello"):
            pass
        provider.force_flush()
        assert len(store) == 1
        _wait(lambda: backend.of("/v1/traces"))
        spans = [
            s
            for r in backend.of("/v1/traces")[0].resource_spans
            for ss in r.scope_spans
            for s in ss.spans
        ]
        assert [s.name for s in spans] == ["hello"]
        headers = backend.received[0][1]
        assert headers["x-scope-orgid"] == "tenant 1"
        assert headers["authorization"] == "Bearer abc"

        logger_provider = LoggerProvider()
        logger_provider.add_log_record_processor(
            SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{pipe.url}/v1/logs", timeout=2))
        )
        import logging

        log = logging.getLogger("fwd-test")
        log.addHandler(LoggingHandler(logger_provider=logger_provider))
        log.warning("a record worth reading")
        logger_provider.force_flush()
        _wait(lambda: backend.of("/v1/logs"))
        bodies = [
            rec.body.string_value
            for r in backend.of("/v1/logs")[0].resource_logs
            for s in r.scope_logs
            for rec in s.log_records
        ]
        assert bodies == ["a record worth reading"]

        # Envoy's access logs come over OTLP/gRPC and leave as OTLP/HTTP.
        assert pipe.log_sink is not None
        with grpc.insecure_channel(pipe.log_sink) as channel:
            stub = logs_service_pb2_grpc.LogsServiceStub(channel)
            request = logs_service_pb2.ExportLogsServiceRequest()
            record = request.resource_logs.add().scope_logs.add().log_records.add()
            record.body.string_value = "GET / 200 - 127.244.1.3:8080"
            stub.Export(request, timeout=5)
        _wait(lambda: len(backend.of("/v1/logs")) == 2)
        _wait(lambda: _count(registry, "logs", "sent") == 2)
        assert _count(registry, "traces", "sent") == 1
        provider.shutdown()
    finally:
        pipe.stop()


def test_retries_then_failure_and_overflow_are_counted(backend: Backend) -> None:
    registry = CollectorRegistry()
    backend.fail_first = 2  # 503 twice, then accepted: retried, counted once as sent
    fwd = Forwarder(backend.url, registry, max_elapsed_s=5)
    try:
        fwd.submit("traces", ExportTraceServiceRequest().SerializeToString(), None, None, 4)
        _wait(lambda: _count(registry, "traces", "sent") == 4)
        assert backend.fail_first == 0
    finally:
        fwd.stop()

    registry = CollectorRegistry()
    dead = Forwarder("http://127.0.0.1:9", registry, max_elapsed_s=0.5)
    try:
        dead.submit("logs", b"x", None, None, 3)
        _wait(lambda: _count(registry, "logs", "failed") == 3)
    finally:
        dead.stop()

    registry = CollectorRegistry()
    tiny = Forwarder("http://127.0.0.1:9", registry, queue_bytes=10, max_elapsed_s=0.5)
    try:
        assert not tiny.submit("metrics", b"x" * 11, None, None, 5)
        assert _count(registry, "metrics", "dropped") == 5
    finally:
        tiny.stop()


def test_bad_headers_and_endpoints_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="not key=value"):
        parse_headers("novalue")
    with pytest.raises(ValueError, match="http:// or https://"):
        Forwarder("ftp://x", CollectorRegistry())


def test_prometheus_exposition_becomes_otlp_metrics_with_the_dashboard_names() -> None:
    reg = CollectorRegistry()
    requests_total = Counter("hopscope_requests", "r", ["code"], registry=reg)
    requests_total.labels("200").inc(3)
    Gauge("hopscope_endpoint_ready", "g", ["service"], registry=reg).labels("catalog").set(1)
    hist = Histogram("hopscope_request_duration_seconds", "h", buckets=(0.1, 1.0), registry=reg)
    for v in (0.05, 0.5, 0.5, 5):
        hist.observe(v)
    target = Target("http://x/metrics", "apps", "127.244.1.3:9464", {"pod": "p", "app": "shop"})
    resource, points = convert(generate_latest(reg).decode(), target, 2, 1)
    attrs = {kv.key: kv.value.string_value for kv in resource.resource.attributes}
    assert attrs["service.name"] == "apps"
    assert attrs["service.instance.id"] == "127.244.1.3:9464"
    assert attrs["k8s.pod.name"] == "p"
    metrics = {m.name: m for m in resource.scope_metrics[0].metrics}
    counter = metrics["hopscope_requests"]  # Prometheus appends _total again on ingestion
    assert counter.sum.is_monotonic and counter.sum.data_points[0].as_double == 3
    point_attrs = {kv.key: kv.value.string_value for kv in counter.sum.data_points[0].attributes}
    assert point_attrs == {"code": "200", "pod": "p", "app": "shop"}
    assert metrics["hopscope_endpoint_ready"].gauge.data_points[0].as_double == 1
    h = metrics["hopscope_request_duration_seconds"].histogram.data_points[0]
    assert list(h.explicit_bounds) == [0.1, 1.0]
    assert list(h.bucket_counts) == [1, 2, 1]
    assert h.count == 4 and h.sum == pytest.approx(6.05)
    # + the two *_created gauges the classic text format exposes (Prometheus keeps them too)
    assert points == 5


def test_receiver_refuses_logs_when_not_forwarding() -> None:
    pipe = TelemetryPipeline(TraceStore(2**20), CollectorRegistry(), host="127.0.0.1", port=0)
    pipe.start()
    try:
        resp = requests.post(f"{pipe.url}/v1/logs", data=b"", timeout=2)
        assert resp.status_code == 404
        assert pipe.log_sink is None
    finally:
        pipe.stop()
