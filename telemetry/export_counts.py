"""What every hopscope process did with the spans and log records it meant to export.

Telemetry loss is never silent: each process counts, on its own Prometheus ``/metrics``,

* ``hopscope_otel_exported_spans_total{outcome}`` and
* ``hopscope_otel_exported_log_records_total{outcome}``,

with ``outcome`` one of ``sent`` (the receiver answered success), ``failed`` (the export
was attempted and failed after the exporter's own retries: receiver down, refused, timed
out) and ``dropped`` (never attempted: the batch queue was full, so the SDK discarded the
oldest item to make room, or the processor had already shut down). Every outcome exists from
the start at 0, so a dashboard's loss query always has a series to show.

The counting sits around the OpenTelemetry SDK's own parts, not in place of them: a
:class:`CountingSpanExporter` / :class:`CountingLogExporter` wraps the OTLP exporter and
counts each batch by its result, and :class:`CountingBatchSpanProcessor` /
:class:`CountingBatchLogRecordProcessor` add one check before the SDK's ``emit``: the SDK
keeps at most ``max_queue_size`` items and, when full, drops the oldest with nothing but a
log line (``opentelemetry-sdk`` 1.45 ``BatchProcessor.emit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk._logs import ReadWriteLogRecord
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import REGISTRY, CollectorRegistry, Counter

OUTCOMES = ("sent", "failed", "dropped")
"""Every ``outcome`` label value, each initialised at 0."""


def _counter(name: str, what: str, registry: CollectorRegistry) -> Counter:
    counter = Counter(
        name,
        f"{what} this process exported over OTLP, by outcome (sent, failed, dropped)",
        ["outcome"],
        registry=registry,
    )
    for outcome in OUTCOMES:
        counter.labels(outcome)
    return counter


class ExportCounters:
    """The two counters of one process (one registry)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.spans = _counter("hopscope_otel_exported_spans", "Spans", registry)
        self.log_records = _counter("hopscope_otel_exported_log_records", "Log records", registry)


_DEFAULT: ExportCounters | None = None


def default_counters() -> ExportCounters:
    """The process-wide counters on the default registry (what ``/metrics`` serves)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ExportCounters()
    return _DEFAULT


class CountingSpanExporter(SpanExporter):
    """Counts each exported batch as ``sent`` or ``failed`` by the wrapped exporter's result."""

    def __init__(self, exporter: SpanExporter, counter: Counter) -> None:
        self.exporter = exporter
        self.sent = counter.labels("sent")
        self.failed = counter.labels("failed")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception:
            self.failed.inc(len(spans))
            raise
        (self.sent if result is SpanExportResult.SUCCESS else self.failed).inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class CountingLogExporter(LogRecordExporter):
    """The log-record counterpart of :class:`CountingSpanExporter`."""

    def __init__(self, exporter: LogRecordExporter, counter: Counter) -> None:
        self.exporter = exporter
        self.sent = counter.labels("sent")
        self.failed = counter.labels("failed")

    def export(self, batch: Sequence[Any]) -> LogRecordExportResult:
        try:
            result = self.exporter.export(batch)
        except Exception:
            self.failed.inc(len(batch))
            raise
        ok = getattr(result, "name", "") == "SUCCESS"  # LogRecordExportResult or its old alias
        (self.sent if ok else self.failed).inc(len(batch))
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.exporter.force_flush(timeout_millis))


def _queue_full(processor: Any) -> bool:
    """Is the SDK batch processor's queue at capacity (so the next item evicts the oldest)?"""
    inner = getattr(processor, "_batch_processor", None)
    queue = getattr(inner, "_queue", None)
    if queue is None:
        return False
    return len(queue) >= queue.maxlen if queue.maxlen is not None else False


def _shut_down(processor: Any) -> bool:
    return bool(getattr(getattr(processor, "_batch_processor", None), "_shutdown", False))


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans it drops (``outcome="dropped"``)."""

    def __init__(self, exporter: SpanExporter, counter: Counter, **kwargs: Any) -> None:
        super().__init__(CountingSpanExporter(exporter, counter), **kwargs)
        self.dropped = counter.labels("dropped")

    def on_end(self, span: ReadableSpan) -> None:
        sampled = span.context is not None and span.context.trace_flags.sampled
        if sampled and (_queue_full(self) or _shut_down(self)):
            self.dropped.inc()
        super().on_end(span)


class CountingBatchLogRecordProcessor(BatchLogRecordProcessor):
    """The SDK's batch log processor, counting the records it drops."""

    def __init__(self, exporter: LogRecordExporter, counter: Counter, **kwargs: Any) -> None:
        super().__init__(CountingLogExporter(exporter, counter), **kwargs)
        self.dropped = counter.labels("dropped")

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        if _queue_full(self) or _shut_down(self):
            self.dropped.inc()
        super().on_emit(log_record)
