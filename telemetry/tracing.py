"""Tracer provider set-up shared by the apps and the data-plane emulators."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from telemetry.export_counts import CountingBatchSpanProcessor, ExportCounters, default_counters

if TYPE_CHECKING:
    import requests

OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
"""Base URL of the OTLP/HTTP receiver; traces go to ``<base>/v1/traces``. Default: unset,
which means spans are not exported (useful in unit tests)."""

HOPSCOPE_EXPORT_DELAY_MS = "HOPSCOPE_EXPORT_DELAY_MS"
"""Batch export delay in milliseconds. Default 200: a learner sees a trace almost at once."""


def setup_tracing(
    service_name: str,
    attributes: dict[str, str] | None = None,
    exporter: SpanExporter | None = None,
    processors: list[SpanProcessor] | None = None,
    set_global: bool = True,
    sample_ratio: float | None = None,
    counters: ExportCounters | None = None,
) -> TracerProvider:
    """Build a TracerProvider for one process.

    ``exporter`` overrides the OTLP exporter (tests pass an in-memory one). Spans are
    exported with a short batch delay so ``hopscope trace --last`` finds them quickly, and
    counted by outcome on ``counters`` (default: the process's ``/metrics`` registry) as
    ``hopscope_otel_exported_spans_total{outcome="sent|failed|dropped"}``.
    """
    resource = Resource.create({"service.name": service_name, **(attributes or {})})
    sampler = None
    if sample_ratio is not None:
        # Root spans are sampled at the ratio; a sampled caller's children always are.
        sampler = ParentBased(TraceIdRatioBased(sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    for processor in processors or []:
        provider.add_span_processor(processor)
    if exporter is None:
        exporter = _otlp_exporter_from_env()
    if exporter is not None:
        delay = int(os.environ.get(HOPSCOPE_EXPORT_DELAY_MS, "200"))
        counter = (counters or default_counters()).spans
        provider.add_span_processor(
            CountingBatchSpanProcessor(
                exporter, counter, schedule_delay_millis=delay, max_export_batch_size=256
            )
        )
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def _otlp_exporter_from_env() -> SpanExporter | None:
    endpoint = os.environ.get(OTEL_EXPORTER_OTLP_ENDPOINT)
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=5, session=receiver_session()
    )


def receiver_session() -> requests.Session:
    """The HTTP session an OTLP exporter sends with: the receiver is the cluster's own, so
    no proxy or ``.netrc`` from the environment applies, and not looking them up spares
    every export request that work."""
    import requests

    session = requests.Session()
    session.trust_env = False
    return session
