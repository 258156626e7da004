"""One OTLP/HTTP export in, one answer out — for every signal, apart from any server.

:class:`Intake` is what both HTTP entry points call (the receiver's own listener and the
API's ``/v1/traces``): traces go through :func:`mesh.tracestore.receiver.receive` into the
store; logs and metrics are accepted only when a forwarder is configured (the embedded store
keeps traces only). Every accepted body is handed to the forwarder as it came — same bytes,
same ``Content-Type`` and ``Content-Encoding`` — so forwarding costs no re-encoding.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client import CollectorRegistry, Counter

from mesh.tracestore.receiver import (
    JSON,
    PROTOBUF,
    Answer,
    ReceiverError,
    decompress,
    error_answer,
    media_type,
    receive,
)
from mesh.tracestore.store import TraceStore

if TYPE_CHECKING:
    from mesh.otlp.forward import Forwarder

SIGNALS = ("traces", "logs", "metrics")
PATHS = {f"/v1/{s}": s for s in SIGNALS}
"""Request path → signal."""

REQUEST_OUTCOMES = ("accepted", "rejected", "unavailable")
"""``accepted``: 2xx; ``rejected``: refused as malformed or not allowed (4xx);
``unavailable``: the receiver is stopped (503 on the API port)."""


class Intake:
    """Decodes, stores, forwards and counts OTLP exports."""

    def __init__(
        self,
        store: TraceStore,
        registry: CollectorRegistry,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.store = store
        self.forwarder = forwarder
        self.accepting = True
        """False while the receiver is stopped (``POST /api/v1/debug/receiver``)."""
        self.requests = Counter(
            "hopscope_otlp_receiver_requests",
            "OTLP export requests the control plane's receiver answered, by signal and "
            "outcome (accepted, rejected, unavailable)",
            ["signal", "outcome"],
            registry=registry,
        )
        for signal in SIGNALS:
            for outcome in REQUEST_OUTCOMES:
                self.requests.labels(signal, outcome)
        self.spans = Counter(
            "hopscope_otlp_spans_received", "Spans received over OTLP", registry=registry
        )

    def add_spans(self, request: ExportTraceServiceRequest) -> None:
        """Spans the control plane wrote itself (the kernel path's hops from conntrack):
        stored, and forwarded as if a component had exported them."""
        self.store.add_export(request)
        spans = sum(len(s.spans) for rs in request.resource_spans for s in rs.scope_spans)
        if self.forwarder is not None and spans:
            body = request.SerializeToString()
            self.forwarder.submit("traces", body, "application/x-protobuf", None, spans)

    def handle(
        self, signal: str, body: bytes, content_type: str | None, content_encoding: str | None
    ) -> Answer:
        """Answer one ``POST /v1/<signal>``."""
        if not self.accepting:
            answer = error_answer(
                503, "the OTLP receiver is stopped", _media_or_protobuf(content_type)
            )
            self.requests.labels(signal, "unavailable").inc()
            return answer
        if signal == "traces":
            answer = receive(self.store, body, content_type, content_encoding)
            self.spans.inc(answer.spans)
            if answer.status == 200 and self.forwarder is not None and answer.spans:
                self.forwarder.submit(signal, body, content_type, content_encoding, answer.spans)
        else:
            answer = self._other(signal, body, content_type, content_encoding)
        outcome = "accepted" if answer.status < 300 else "rejected"
        self.requests.labels(signal, outcome).inc()
        return answer

    def _other(
        self, signal: str, body: bytes, content_type: str | None, content_encoding: str | None
    ) -> Answer:
        media = _media_or_protobuf(content_type)
        if self.forwarder is None:
            return error_answer(
                404,
                f"/v1/{signal} is served only when hopscope forwards telemetry "
                "(hopscope up --otlp-endpoint URL); the embedded store keeps traces",
                media,
            )
        try:
            media = media_type(content_type)
            raw = decompress(body, content_encoding)
            items = count_items(signal, raw, media == JSON)
        except ReceiverError as exc:
            return error_answer(exc.status, exc.message, media)
        except ValueError as exc:
            return error_answer(400, str(exc), media)
        self.forwarder.submit(signal, body, content_type, content_encoding, items)
        response: Message = (
            ExportLogsServiceResponse() if signal == "logs" else ExportMetricsServiceResponse()
        )
        if media == JSON:
            return Answer(200, b"{}", JSON)
        return Answer(200, response.SerializeToString(), PROTOBUF)


def _media_or_protobuf(content_type: str | None) -> str:
    try:
        return media_type(content_type)
    except ReceiverError:
        return PROTOBUF


def count_items(signal: str, raw: bytes, json_body: bool) -> int:
    """Log records or metric data points in an export; ValueError if it is not one."""
    if json_body:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not an OTLP {signal} export (JSON): {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"not an OTLP {signal} export (JSON): the body must be an object")
        return _count_json(signal, doc)
    request: Any = ExportLogsServiceRequest() if signal == "logs" else ExportMetricsServiceRequest()
    try:
        request.ParseFromString(raw)
    except DecodeError as exc:
        raise ValueError(f"not an OTLP {signal} export (protobuf): {exc}") from None
    if signal == "logs":
        return sum(len(s.log_records) for r in request.resource_logs for s in r.scope_logs)
    return sum(
        data_points(metric)
        for r in request.resource_metrics
        for s in r.scope_metrics
        for metric in s.metrics
    )


def data_points(metric: Any) -> int:
    """Data points of one OTLP ``Metric``, whatever its kind."""
    kind = metric.WhichOneof("data")
    return len(getattr(metric, kind).data_points) if kind else 0


def _count_json(signal: str, doc: dict[str, Any]) -> int:
    def items(obj: Any, *keys: str) -> list[Any]:
        for key in keys:
            value = obj.get(key) if isinstance(obj, dict) else None
            if isinstance(value, list):
                return value
        return []

    if signal == "logs":
        return sum(
            len(items(s, "logRecords", "log_records"))
            for r in items(doc, "resourceLogs", "resource_logs")
            for s in items(r, "scopeLogs", "scope_logs")
        )
    total = 0
    for r in items(doc, "resourceMetrics", "resource_metrics"):
        for s in items(r, "scopeMetrics", "scope_metrics"):
            for metric in items(s, "metrics"):
                for kind in ("sum", "gauge", "histogram", "exponentialHistogram", "summary"):
                    if isinstance(metric, dict) and isinstance(metric.get(kind), dict):
                        total += len(items(metric[kind], "dataPoints", "data_points"))
    return total
