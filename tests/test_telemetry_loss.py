"""Telemetry loss is counted, never silent: the SDK's exporter in every hopscope process,
and the control plane's OTLP receiver on its own listener (stoppable on its own).

Real parts throughout: the OpenTelemetry SDK's batch processor and OTLP/HTTP exporter, the
receiver's asyncio/httptools listener on a real socket, the trace store, the API app.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from mesh.controlplane.api import create_app
from mesh.otlp.pipeline import TelemetryPipeline
from mesh.tracestore.store import TraceStore
from telemetry.export_counts import CountingBatchSpanProcessor, ExportCounters
from telemetry.tracing import setup_tracing


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} not exposed"
    return value


@pytest.fixture
def pipeline() -> Iterator[TelemetryPipeline]:
    store = TraceStore(16 * 2**20)
    pipe = TelemetryPipeline(store, CollectorRegistry(), host="127.0.0.1", port=0)
    pipe.start()
    try:
        yield pipe
    finally:
        pipe.stop()


def _spans(provider: TracerProvider, n: int, name: str = "op") -> None:
    tracer = provider.get_tracer("test")
    for i in range(n):
        with tracer.start_as_current_span(f"{name}-{i}"):
            pass


def test_every_outcome_exists_at_zero() -> None:
    registry = CollectorRegistry()
    ExportCounters(registry)
    for name in ("hopscope_otel_exported_spans_total", "hopscope_otel_exported_log_records_total"):
        for outcome in ("sent", "failed", "dropped"):
            assert _value(registry, name, outcome=outcome) == 0


def test_sent_then_failed_while_the_receiver_is_stopped_then_sent_again(
    pipeline: TelemetryPipeline,
) -> None:
    registry = CollectorRegistry()
    counters = ExportCounters(registry)
    exporter = OTLPSpanExporter(endpoint=f"{pipeline.url}/v1/traces", timeout=1)
    provider = setup_tracing("loss-test", exporter=exporter, set_global=False, counters=counters)
    spans = "hopscope_otel_exported_spans_total"
    _spans(provider, 5)
    provider.force_flush()
    assert _value(registry, spans, outcome="sent") == 5
    assert len(pipeline.intake.store) == 5
    assert pipeline.intake.requests.labels("traces", "accepted")._value.get() >= 1

    pipeline.set_running(False)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", pipeline.server.port), timeout=1).close()
    _spans(provider, 3, "lost")
    provider.force_flush()
    assert _value(registry, spans, outcome="failed") == 3
    assert _value(registry, spans, outcome="sent") == 5

    pipeline.set_running(True)
    _spans(provider, 2, "back")
    provider.force_flush()
    assert _value(registry, spans, outcome="sent") == 7
    assert len(pipeline.intake.store) == 7
    provider.shutdown()


def test_a_full_queue_drops_and_counts(pipeline: TelemetryPipeline) -> None:
    """The SDK drops the oldest span when its queue is full; the drop is counted."""
    # A listener that accepts but never answers: the first export blocks for its timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    registry = CollectorRegistry()
    counters = ExportCounters(registry)
    exporter = OTLPSpanExporter(
        endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}/v1/traces", timeout=2
    )
    processor = CountingBatchSpanProcessor(
        exporter,
        counters.spans,
        max_queue_size=4,
        max_export_batch_size=4,
        schedule_delay_millis=60_000,
    )
    provider = TracerProvider()
    provider.add_span_processor(processor)
    try:
        _spans(provider, 4, "first")  # a full batch: the worker takes it and blocks
        time.sleep(0.3)
        _spans(provider, 4, "queued")  # fills the queue
        _spans(provider, 3, "over")  # each evicts the oldest queued span
        assert _value(registry, "hopscope_otel_exported_spans_total", outcome="dropped") == 3
    finally:
        silent.close()
        provider.shutdown()
    total = sum(
        _value(registry, "hopscope_otel_exported_spans_total", outcome=o)
        for o in ("sent", "failed", "dropped")
    )
    assert total == 11, "every span is accounted for: sent, failed or dropped"


def test_api_port_answers_503_while_the_receiver_is_stopped(
    pipeline: TelemetryPipeline,
) -> None:
    """Both ways in stop together: the API's /v1/traces refuses while the receiver is down."""

    class _Cluster:
        lock = threading.Lock()

        def snapshot(self) -> dict[str, int]:
            return {"resource_version": 0}

    registry = CollectorRegistry()
    store = pipeline.intake.store
    app = create_app(_Cluster(), store, status=dict, registry=registry, pipeline=pipeline)
    client = app.test_client()
    assert client.get("/api/v1/debug/receiver").get_json()["running"] is True
    assert client.post("/api/v1/debug/receiver", json={"running": "no"}).status_code == 400
    assert client.post("/api/v1/debug/receiver", json={"running": False}).get_json() == {
        "running": False,
        "url": pipeline.url,
        "forward_endpoint": None,
    }
    resp = client.post("/v1/traces", data=b"", content_type="application/x-protobuf")
    assert resp.status_code == 503
    assert pipeline.intake.requests.labels("traces", "unavailable")._value.get() == 1
    assert client.post("/api/v1/debug/receiver", json={"running": True}).get_json()["running"]
    assert requests.get(f"{pipeline.url}/health", timeout=2).status_code == 200


def test_receiver_listener_speaks_http_as_exporters_expect(pipeline: TelemetryPipeline) -> None:
    """Keep-alive, 404/405, a bad body is a 400 with a google.rpc.Status, a too-large one 413."""
    session = requests.Session()
    url = pipeline.url
    assert session.get(f"{url}/v1/traces", timeout=2).status_code == 405
    assert session.post(f"{url}/v1/nothing", data=b"", timeout=2).status_code == 404
    bad = session.post(
        f"{url}/v1/traces",
        data=b"\xff\xff",
        headers={"Content-Type": "application/x-protobuf"},
        timeout=2,
    )
    assert bad.status_code == 400
    from google.rpc.status_pb2 import Status

    assert "not an OTLP trace export" in Status.FromString(bad.content).message
    logs = session.post(f"{url}/v1/logs", data=b"", timeout=2)
    assert logs.status_code == 404  # no forwarding: the store keeps traces only
    with socket.create_connection(("127.0.0.1", pipeline.server.port), timeout=2) as sock:
        sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 413")
    assert pipeline.intake.requests.labels("traces", "rejected")._value.get() >= 2
